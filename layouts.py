"""transformers' layouts, both ways: SmolVLM/Idefics3 and LLaVA config.json files and tensor names read
as glimpse's (VLM.from_pretrained) and written back from a glimpse VLM (export.py); SmolVLM's images, cut
into tiles (SmolVLMImageProcessor), and the tokens each stands for in a prompt; BLIP-2's and BERT's
tensor names for the Q-Former (qformer.QFormer.from_pretrained, from_bert).

    settings, key_map = hf_vlm_settings(config)      # config.json of a smolvlm, idefics3 or llava model
    hf_config, names = hf_vlm_layout(vlm.config)      # ours -> theirs, or a ValueError naming the part
    image_tokens = smolvlm_image_tokens(rows, cols, 64)  # what one SmolVLM image stands for in a prompt

A layout is a config (vision tower, connector, LM) and a key map, transformers' tensor name -> ours.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from checkpoints import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, load_image_processor
from configs import (activation_name, build_config, check_resample_and_normalize, check_sizes, hf_lm_config,
                     vision_settings)
from model import LMConfig, lm_config_from_hf, lm_key_map
from processing import Special, load_image, rescale_and_normalize
from siglip import VisionConfig, vision_key_map

SMOLVLM_KINDS = ("smolvlm", "idefics3")


# ---------------------------------------------------------------------------------------------
# SmolVLM's images: tiles, and the tokens an image stands for
# ---------------------------------------------------------------------------------------------

# A big image cut into square tiles, plus the whole image shrunk to one tile.
SMOLVLM_MAX_IMAGE_SIZE = 4096  # transformers' MAX_IMAGE_SIZE: no side is resized beyond this


@dataclass
class SmolVLMImageProcessor:
    """Images -> S x S tiles as transformers' SmolVLMImageProcessor (image_processing_pil_smolvlm.py):
    resized to size["longest_edge"], cut into rows x cols tiles of S = max_image_size["longest_edge"],
    then a global tile, the whole image squashed. `do_pad` is read and has nothing to do."""

    size: dict = field(default_factory=lambda: {"longest_edge": 4 * 364})
    max_image_size: dict = field(default_factory=lambda: {"longest_edge": 364})
    resample: int = Image.Resampling.LANCZOS
    do_resize: bool = True
    do_image_splitting: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = IMAGENET_STANDARD_MEAN
    image_std: tuple = IMAGENET_STANDARD_STD
    do_pad: bool = True

    def __post_init__(self):
        if self.do_resize:
            check_sizes("size", self.size, ({"longest_edge"}, {"height", "width"}))
        check_sizes("max_image_size", self.max_image_size, ({"longest_edge"},))
        check_resample_and_normalize(self)

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "SmolVLMImageProcessor":
        """From preprocessor_config.json in a folder or a hub id like "HuggingFaceTB/SmolVLM-256M-Instruct"."""
        return load_image_processor(cls, name_or_path, smolvlm=True)

    def __call__(self, images) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """pixel_values (N_tiles, 3, S, S), every image's tiles (rows * cols + 1, or 1 when (0, 0)),
        and grids, (rows, cols) per image. No pixel_attention_mask: every tile is a full S x S."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("SmolVLMImageProcessor got an empty list of images")
        tiles, grids = [], []
        for image in images:
            image_tiles, grid = self.tiles(load_image(image))
            tiles += [rescale_and_normalize(np.array(tile).transpose(2, 0, 1), self)  # (3, S, S) each
                      for tile in image_tiles]
            grids.append(grid)
        return torch.from_numpy(np.stack(tiles)), grids  # (N_tiles, 3, S, S)

    def tiles(self, image: Image.Image) -> tuple[list[Image.Image], tuple[int, int]]:
        """One RGB image -> its S x S tiles (row by row, then the global tile) and (rows, cols)."""
        tile = self.max_image_size["longest_edge"]
        if self.do_resize:
            image = self.resize(image, *self.resize_output_size(image.height, image.width))
        if not self.do_image_splitting:
            return [self.resize(image, tile, tile)], (0, 0)
        # Sides up to multiples of S (resize_for_vision_encoder): the longer, then the other by the aspect ratio.
        height, width, aspect_ratio = image.height, image.width, image.width / image.height
        if width >= height:
            width = math.ceil(width / tile) * tile
            height = math.ceil(int(width / aspect_ratio) / tile) * tile
        else:
            height = math.ceil(height / tile) * tile
            width = math.ceil(int(height * aspect_ratio) / tile) * tile
        image = self.resize(image, height, width)
        if image.height <= tile and image.width <= tile:
            return [image], (0, 0)  # exactly one tile
        rows, cols = image.height // tile, image.width // tile
        crops = [image.crop((col * tile, row * tile, (col + 1) * tile, (row + 1) * tile))
                 for row in range(rows) for col in range(cols)]
        return crops + [self.resize(image, tile, tile)], (rows, cols)

    def resize(self, image: Image.Image, height: int, width: int) -> Image.Image:
        return image.resize((width, height), resample=self.resample)  # Pillow on uint8, as transformers

    def resize_output_size(self, height: int, width: int) -> tuple[int, int]:
        """`size` itself, or the longest edge to size["longest_edge"] and the other in proportion, made
        even, then both under SMOLVLM_MAX_IMAGE_SIZE (transformers' get_resize_output_image_size)."""
        if "longest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        longest, aspect_ratio = self.size["longest_edge"], width / height
        if width >= height:
            width, height = longest, int(longest / aspect_ratio)
            height += height % 2
        else:
            height, width = longest, int(longest * aspect_ratio)
            width += width % 2
        height, width = max(height, 1), max(width, 1)
        aspect_ratio = width / height
        if width >= height and width > SMOLVLM_MAX_IMAGE_SIZE:
            width, height = SMOLVLM_MAX_IMAGE_SIZE, int(SMOLVLM_MAX_IMAGE_SIZE / aspect_ratio)
        elif height > width and height > SMOLVLM_MAX_IMAGE_SIZE:
            height, width = SMOLVLM_MAX_IMAGE_SIZE, int(SMOLVLM_MAX_IMAGE_SIZE * aspect_ratio)
        return max(height, 1), max(width, 1)


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


# ---------------------------------------------------------------------------------------------
# BLIP-2's Q-Former, and BERT's text encoder that starts one: their tensor names -> ours
# (configs.py reads their configs; qformer.QFormer.from_pretrained loads them)
# ---------------------------------------------------------------------------------------------

# The tensors of a BLIP-2 checkpoint that belong to the Q-Former (the vision tower is "vision_model.*",
# the LM "language_model.*"; "language_projection" maps into the LM and is the VLM connector's).
BLIP2_PREFIXES = ("qformer.", "query_tokens", "embeddings.", "vision_projection.", "text_projection.", "itm_head.")
BLIP2_IGNORED = ("embeddings.position_ids",)  # a buffer some older checkpoints saved
# What a Blip2QFormerModel saved alone lacks: its caller passes these in (BLIP-2 keeps them outside it).
BLIP2_QFORMER_INPUTS = ("query_tokens", "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight")
BERT_HEADS = ("cls.", "vocab_", "classifier.", "pre_classifier.", "qa_outputs.")  # task heads: not read
BERT_IGNORED = ("pooler.", "embeddings.position_ids", "embeddings.token_type_ids")


def linear_and_norm_names(theirs: str, ours: str) -> dict:
    return {f"{theirs}.{p}": (f"{ours}.{p}",) for p in ("weight", "bias")}


def blip2_key_map(cfg) -> dict[str, tuple[str, ...]]:
    """Checkpoint tensor names (after configs.blip2_name) -> ours."""
    m = {"query_tokens": ("query_tokens",)}
    m |= linear_and_norm_names("qformer.layernorm", "embed_norm")
    if cfg.text:
        m["embeddings.word_embeddings.weight"] = ("word_embed.weight",)
        m["embeddings.position_embeddings.weight"] = ("pos_embed.weight",)
    if cfg.proj_dim is not None:
        m |= linear_and_norm_names("vision_projection", "vision_proj")
        m |= linear_and_norm_names("text_projection", "text_proj")
    if cfg.itm_head:
        m |= linear_and_norm_names("itm_head", "itm_head")
    for i in range(cfg.n_layers):
        hf, ours = f"qformer.encoder.layer.{i}.", f"layers.{i}."
        parts = [("attention", "self_attn")]
        if i % cfg.cross_attention_frequency == 0:
            parts.append(("crossattention", "cross_attn"))
        for theirs, mine in parts:
            for a, b in (("attention.query", "q"), ("attention.key", "k"), ("attention.value", "v"),
                         ("output.dense", "o"), ("output.LayerNorm", "norm")):
                m |= linear_and_norm_names(hf + f"{theirs}.{a}", ours + f"{mine}.{b}")
        ffns = [("intermediate_query.dense", "query_ffn.fc1"), ("output_query.dense", "query_ffn.fc2"),
                ("output_query.LayerNorm", "query_ffn.norm")]
        if cfg.text:
            ffns += [("intermediate.dense", "text_ffn.fc1"), ("output.dense", "text_ffn.fc2"),
                     ("output.LayerNorm", "text_ffn.norm")]
        for theirs, mine in ffns:
            m |= linear_and_norm_names(hf + theirs, ours + mine)
    return m


def bert_key_map(cfg, kind: str) -> dict[str, tuple[str, ...]]:
    """BERT / DistilBERT names (after configs.bert_state drops the "bert."/"distilbert." prefix) ->
    ours; a feed-forward tensor fills both the text and the query feed-forward, as BLIP-2 copies it."""
    m = {"embeddings.word_embeddings.weight": ("word_embed.weight",),
         "embeddings.position_embeddings.weight": ("pos_embed.weight",)}
    m |= linear_and_norm_names("embeddings.LayerNorm", "embed_norm")
    if kind == "bert":
        layer, parts = "encoder.layer.{}.", [
            ("attention.self.query", "self_attn.q"), ("attention.self.key", "self_attn.k"),
            ("attention.self.value", "self_attn.v"), ("attention.output.dense", "self_attn.o"),
            ("attention.output.LayerNorm", "self_attn.norm"), ("intermediate.dense", "*.fc1"),
            ("output.dense", "*.fc2"), ("output.LayerNorm", "*.norm")]
    else:
        layer, parts = "transformer.layer.{}.", [
            ("attention.q_lin", "self_attn.q"), ("attention.k_lin", "self_attn.k"),
            ("attention.v_lin", "self_attn.v"), ("attention.out_lin", "self_attn.o"),
            ("sa_layer_norm", "self_attn.norm"), ("ffn.lin1", "*.fc1"), ("ffn.lin2", "*.fc2"),
            ("output_layer_norm", "*.norm")]
    for i in range(cfg.n_layers):
        for theirs, mine in parts:
            for p in ("weight", "bias"):
                targets = [mine.replace("*", ffn) for ffn in ("text_ffn", "query_ffn")] if "*" in mine else [mine]
                m[layer.format(i) + f"{theirs}.{p}"] = tuple(f"layers.{i}.{t}.{p}" for t in targets)
    return m
