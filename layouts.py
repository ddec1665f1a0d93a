"""transformers' VLM layouts, both ways: SmolVLM/Idefics3 and LLaVA config.json files and tensor names read
as glimpse's (VLM.from_pretrained) and written back from a glimpse VLM (export.py).

    settings, key_map = hf_vlm_settings(config)      # config.json of a smolvlm, idefics3 or llava model
    hf_config, names = hf_vlm_layout(vlm.config)      # ours -> theirs, or a ValueError naming the part
    image_tokens = smolvlm_image_tokens(rows, cols, 64)  # what one SmolVLM image stands for in a prompt

A layout is a config (vision tower, connector, LM) and a key map, transformers' tensor name -> ours.
"""

from configs import activation_name, build_config, hf_lm_config, vision_settings
from model import LMConfig, lm_config_from_hf, lm_key_map
from processing import Special
from siglip import VisionConfig, vision_key_map

SMOLVLM_KINDS = ("smolvlm", "idefics3")


# ---------------------------------------------------------------------------------------------
# SmolVLM's prompt: the tokens an image stands for
# ---------------------------------------------------------------------------------------------

# The SmolVLM tokenizer's special tokens for images and turns; a text-only tokenizer (SmolLM2's)
# needs them added: tokenizer.add_special_tokens(SMOLVLM_SPECIAL_TOKENS).
SMOLVLM_SPECIAL_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>",
                          *[f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)],
                          "<end_of_utterance>"]


def smolvlm_image_tokens(rows: int, cols: int, image_seq_len: int) -> list:
    r"""The parts a SmolVLM image of grid (rows, cols) stands for, as transformers' _prompt_split_image:
    `<fake_token_around_image><row_r_col_c>` and `image_seq_len` <image>s per tile, "\n" after each
    row, then "\n" and the global tile; the global tile alone for (0, 0) (_prompt_single_image)."""
    around, image = Special("<fake_token_around_image>"), [Special("<image>")] * image_seq_len
    global_tile = [around, Special("<global-img>"), *image, around]
    if rows == 0 and cols == 0:
        return global_tile
    parts = []
    for row in range(1, rows + 1):
        for col in range(1, cols + 1):
            parts += [around, Special(f"<row_{row}_col_{col}>"), *image]
        parts.append("\n")
    return [*parts, "\n", *global_tile]


# ---------------------------------------------------------------------------------------------
# Reading: config.json -> our settings and key map
# ---------------------------------------------------------------------------------------------


# transformers' LlamaConfig defaults: save_pretrained leaves out what equals them (llava-1.5's text_config
# holds four fields), and LlavaConfig's default tower (CLIP ViT-L/14 at 336 px) when it has no vision_config
LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}
LLAVA_TOWER = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "patch_size": 14,
               "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16}


def text_settings(hf: dict) -> LMConfig:
    """A VLM config.json's text_config as our LMConfig (a Llama unless it says otherwise)."""
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "llama")
    if text["model_type"] == "llama":
        text = {**LLAMA_DEFAULTS, **text}
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    return lm_config_from_hf(text)[0]


def hf_vlm_settings(hf: dict) -> tuple[dict, callable]:
    """VLMConfig's fields from a SmolVLM/Idefics3 or LLaVA config.json, and the function that makes
    the layout's key map from the built config."""
    kind = hf.get("model_type")
    if kind in SMOLVLM_KINDS:  # a SigLIP, its patches pixel-shuffled, a Llama
        vision = build_config(VisionConfig, vision_settings({**(hf.get("vision_config") or {}),
                                                             "model_type": "siglip_vision_model"}))
        return dict(vision=vision, lm=text_settings(hf), connector="pixel_shuffle",
                    image_token_id=hf.get("image_token_id", 49190),  # SmolVLM's <image>, if the file omits it
                    scale_factor=hf.get("scale_factor", 2)), smolvlm_key_map
    if kind == "llava":  # a CLIP or SigLIP, LLaVA-1.5's two-layer projector, a Llama
        vision_hf = dict(hf.get("vision_config") or LLAVA_TOWER)
        vision_hf["model_type"] = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}.get(
            vision_hf.get("model_type"), vision_hf.get("model_type"))
        vision = build_config(VisionConfig, vision_settings(vision_hf))
        layer, strategy = hf.get("vision_feature_layer", -2), "default" if vision.cls_token else "full"
        layer = -(vision.n_layers + 1) if layer == 0 else layer  # transformers' 0: the embeddings; ours: the last
        for what, wanted, value in [  # "default" drops the first token: a CLIP's class token, as we do
                ("vision_feature_select_strategy", strategy, hf.get("vision_feature_select_strategy", "default")),
                ("projector_hidden_act", "gelu", hf.get("projector_hidden_act", "gelu")),
                ("multimodal_projector_bias", True, hf.get("multimodal_projector_bias", True)),
                ("vision_feature_layer", "one layer", "one layer" if isinstance(layer, int) else layer)]:
            if value != wanted:
                raise ValueError(f"LLaVA with {what} {value!r} is not supported here ({wanted!r} is, "
                                 f"for a {vision.family} tower)")
        return dict(vision=vision, lm=text_settings(hf), connector="mlp", vision_layer=layer,
                    image_token_id=hf.get("image_token_id", hf.get("image_token_index", 32000))), llava_key_map
    raise ValueError(f"config.json describes a {kind!r} model; VLM loads smolvlm, idefics3 and llava checkpoints "
                     "and folders saved by glimpse")


def smolvlm_key_map(cfg) -> dict[str, str]:
    """The hub's SmolVLM tensor names -> ours: model.vision_model.* (a SigLIP), the connector's
    model.connector.modality_projection.proj, model.text_model.* and lm_head (a Llama)."""
    key_map = {f"model.vision_model.{k}": f"vision.{v}" for k, v in vision_key_map(cfg.vision).items()}
    key_map["model.connector.modality_projection.proj.weight"] = "connector.proj.weight"
    for k, v in lm_key_map(cfg.lm).items():
        key_map[k.replace("model.", "model.text_model.", 1) if k.startswith("model.") else k] = f"lm.{v}"
    return key_map


# transformers reads LLaVA files in two spellings: the hub's (what save_pretrained writes) and its
# modules' own names. Ours is the hub's; `llava_names` brings the other to it.
LLAVA_RENAMES = [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                 ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head."),
                 ("vision_tower.vision_model.", "vision_tower.")]


LLAVA_UNREAD = ("vision_tower.head.", "vision_tower.embeddings.position_ids")  # SigLIP's pooling head: unused


def llava_names(state: dict) -> dict:
    """A LLaVA state dict under the hub's names, whichever spelling the file used."""
    renamed = {}
    for name, tensor in state.items():
        for old, new in LLAVA_RENAMES:
            if name.startswith(old):
                name = new + name[len(old):]
        renamed[name] = tensor
    return renamed


def llava_key_map(cfg) -> dict[str, str]:
    """LLaVA's hub tensor names -> ours: vision_tower.* (a CLIP/SigLIP vision model), the projector's
    multi_modal_projector.linear_1/linear_2, language_model.model.* and language_model.lm_head (a Llama)."""
    key_map = {f"vision_tower.{k}": f"vision.{v}" for k, v in vision_key_map(cfg.vision).items()}
    for theirs, ours in (("linear_1", "fc1"), ("linear_2", "fc2")):
        for p in ("weight", "bias"):
            key_map[f"multi_modal_projector.{theirs}.{p}"] = f"connector.{ours}.{p}"
    key_map.update({f"language_model.{k}": f"lm.{v}" for k, v in lm_key_map(cfg.lm).items()})
    return key_map


# ---------------------------------------------------------------------------------------------
# Writing: our VLM config -> transformers' config.json and tensor names
# ---------------------------------------------------------------------------------------------

HF_ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "gelu": "gelu"}


def hf_vision_config(v: VisionConfig, model_type: str) -> dict:
    """transformers' vision config.json for our SigLIP or CLIP tower (the inverse of vision_settings)."""
    hf = {"model_type": model_type, "hidden_size": v.dim, "intermediate_size": v.hidden_dim,
          "num_hidden_layers": v.n_layers, "num_attention_heads": v.n_heads, "image_size": v.image_size,
          "patch_size": v.patch_size, "layer_norm_eps": v.norm_eps, "hidden_act": HF_ACTIVATIONS[v.act]}
    if activation_name(hf["hidden_act"]) != v.act:
        raise ValueError(f"the tower's activation {v.act!r} has no transformers name")
    return hf


def hf_vlm_layout(cfg) -> tuple[dict, dict[str, str]]:
    """(config.json, {our tensor name: theirs}) of the transformers class that computes what our VLM
    `cfg` computes: Idefics3 (SmolVLM) for a SigLIP tower, the pixel_shuffle connector and the normed
    last layer; LLaVA for a CLIP/SigLIP tower and the mlp connector. Anything else is a ValueError
    naming the part transformers has no counterpart for."""
    v = cfg.vision
    if v.conv_stem:
        raise ValueError("the tower's ConvStem (a from-scratch tower's early convolutions) has no transformers "
                         "counterpart")
    standard = {"siglip": (False, False, True, "all"), "clip": (True, True, False, "cls")}.get(v.family)
    if standard and ((v.cls_token, v.pre_norm, v.patch_bias, v.post_norm) != standard or v.layer_scale):
        raise ValueError(f"this {v.family} tower's flags (cls_token {v.cls_token}, pre_norm {v.pre_norm}, patch_bias "
                         f"{v.patch_bias}, post_norm {v.post_norm!r}, layer_scale {v.layer_scale}) are not "
                         f"transformers' {v.family} vision model")
    if v.family == "dinov2" or cfg.connector not in ("pixel_shuffle", "mlp"):
        part = f"a {v.family} tower with the {cfg.connector!r} connector"
        raise ValueError(f"{part} has no transformers VLM class (Idefics3: SigLIP + pixel_shuffle; LLaVA: CLIP or "
                         "SigLIP + mlp)")
    text = hf_lm_config(vars(cfg.lm))
    if text["model_type"] != "llama":
        raise ValueError(f"the LM is {text['model_type']!r}; transformers' VLM classes here take a Llama LM")
    if cfg.connector == "pixel_shuffle":
        if v.family != "siglip" or cfg.vision_layer != 0 or v.cls_token or cfg.image_size not in (0, v.image_size):
            raise ValueError("Idefics3 reads a SigLIP's normed last layer at its own image size: this pixel_shuffle "
                             f"VLM has a {v.family} tower, vision_layer {cfg.vision_layer}, images of "
                             f"{cfg.image_size} px")
        hf = {"architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3",
              "vision_config": hf_vision_config(v, "idefics3_vision"), "text_config": text,
              "scale_factor": cfg.scale_factor, "image_token_id": cfg.image_token_id,
              "tie_word_embeddings": cfg.lm.tie_embeddings}
        key_map = smolvlm_key_map(cfg)
    else:
        if cfg.vision_layer == 0 and v.post_norm != "cls" or cfg.image_size not in (0, v.image_size):
            raise ValueError("LLaVA reads a layer's hidden states before any final norm, at the tower's own image "
                             f"size: this VLM reads the normed last layer (vision_layer 0) or {cfg.image_size} px "
                             "images")
        hf = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
              "vision_config": hf_vision_config(v, f"{v.family}_vision_model"), "text_config": text,
              "vision_feature_layer": cfg.vision_layer or -1,  # a CLIP's 0 is its last layer, unnormed
              "vision_feature_select_strategy": "default" if v.cls_token else "full", "projector_hidden_act": "gelu",
              "multimodal_projector_bias": True, "image_token_id": cfg.image_token_id,
              "image_seq_length": cfg.tokens_per_image(), "tie_word_embeddings": cfg.lm.tie_embeddings}
        key_map = llava_key_map(cfg)
    return hf, {ours: theirs for theirs, ours in key_map.items()}
