"""Configs: every field of a config.json checked against its dataclass (`build_config`), the limits
a config may ask for, and transformers' config.json files read as the fields of ours (`lm_settings`,
`vision_settings`, BLIP-2's and BERT's Q-Former settings). model.py, siglip.py and qformer.py build
their config dataclasses from these dicts and keep their own key maps.
"""

import json
import math
import os
import typing
from dataclasses import fields, is_dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from checkpoints import CheckpointError

# ---------------------------------------------------------------------------------------------
# Configs: every field of a config.json checked against its dataclass
# ---------------------------------------------------------------------------------------------

# The largest side, in pixels, that a config may ask an image, crop, tile or vision tower to have: a
# preprocessor_config.json asking for 100000 x 100000 would otherwise fill the memory in one resize.
MAX_IMAGE_SIDE = 8192

# The activations a config may name (siglip.py, qformer.py).
ACTIVATIONS = {
    "gelu": F.gelu,  # exact (BERT, BLIP-2, DINOv2)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP
    "relu": F.relu,
}


def activation_name(hf_name):
    """Our name (a key of ACTIVATIONS) for a transformers config's hidden_act: its tanh GELUs are "gelu_tanh"."""
    return {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(hf_name, hf_name)


def check_memory(what: str, n_params: int, bytes_per: int = 2) -> None:
    """Refuse, before anything is built, a config whose weights alone (in bfloat16, the smallest float
    they load as) exceed this machine's memory: a config.json asking for a million layers would
    otherwise run for minutes, then fail."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if n_params * bytes_per > memory:
        raise ValueError(f"{what} asks for {n_params:,} parameters ({n_params * bytes_per / 2 ** 30:,.0f} GiB), "
                         f"more than this machine's {memory / 2 ** 30:,.0f} GiB of memory")


def check_side(name: str, side) -> None:
    """A side in pixels from a config: a whole number from 1 to MAX_IMAGE_SIDE."""
    if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_IMAGE_SIDE:
        raise ValueError(f"{name} must be a whole number of pixels from 1 to {MAX_IMAGE_SIDE} "
                         f"(configs.MAX_IMAGE_SIDE), not {side!r}")


def check_sizes(name: str, sizes, keys: tuple) -> None:
    """An image processor's size setting: a dict with one of the key sets in `keys`, every side a check_side."""
    if not isinstance(sizes, dict) or set(sizes) not in keys:
        wanted = ", or ".join(" and ".join(sorted(k)) for k in keys)
        raise ValueError(f"{name} must have the keys {wanted}; got {sizes}")
    for key, side in sizes.items():
        check_side(f"{name}.{key}", side)


def check_resample_and_normalize(settings) -> None:
    """The checks every image processor's settings share: a Pillow filter, 3 means and 3 stds."""
    if settings.resample not in set(Image.Resampling):
        raise ValueError(f"resample must be a Pillow filter number 0-5; got {settings.resample!r}")
    for values in (settings.image_mean, settings.image_std):
        if settings.do_normalize and len(values) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, one per RGB channel; got {values}")
    finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (*settings.image_mean, *settings.image_std))
    if settings.do_normalize and (not finite or min(settings.image_std) <= 0):
        raise ValueError(f"image_mean must be numbers and image_std positive numbers; got {settings.image_mean}, "
                         f"{settings.image_std}")
    if settings.do_rescale and not 0 < settings.rescale_factor < math.inf:
        raise ValueError(f"rescale_factor must be a positive number, not {settings.rescale_factor}")


def build_config(cls, settings: dict, prefix: str = ""):
    """cls(**settings) for a config dataclass read from a config.json, each value checked against its
    field's annotation (int, float, bool, str, dict, a nested config, or null where "| None" allows
    it). An unknown key, a value of the wrong type or one the class refuses is a one-line
    CheckpointError naming the field: 'config.json: vision.patch_size must be int, not "16"'.
    `prefix` names a nested config's fields ("vision."). A "model_type" key names the class, not a field:
    left out."""
    kinds = {f.name: f.type for f in fields(cls)}
    values = {}
    for key, value in settings.items():
        if key == "model_type":
            continue
        if key not in kinds:
            raise CheckpointError(f"config.json: unknown key {prefix + key!r} (not a field of {cls.__name__})")
        allowed = typing.get_args(kinds[key]) or (kinds[key],)  # int | None -> (int, NoneType)
        nested = next((kind for kind in allowed if is_dataclass(kind)), None)
        if nested is not None and isinstance(value, dict):
            value = build_config(nested, value, f"{prefix}{key}.")
        elif not any(fits(value, kind) for kind in allowed):
            names = " or ".join("null" if kind is type(None) else "an object" if is_dataclass(kind) else kind.__name__
                                for kind in allowed)
            raise CheckpointError(f"config.json: {prefix}{key} must be {names}, not {json.dumps(value)}")
        values[key] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: {prefix}{e}") from None


def fits(value, kind) -> bool:
    """Whether a JSON value suits a field of type `kind`: an int is a float too, true is not an int."""
    if kind is float:
        return type(value) in (int, float)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


# ---------------------------------------------------------------------------------------------
# transformers' config.json files as the fields of our configs: model.py, siglip.py and qformer.py
# build their config dataclasses from these dicts and keep their own key maps
# ---------------------------------------------------------------------------------------------


def lm_settings(hf: dict) -> dict:
    """LMConfig's fields from a Llama or Qwen2 config.json (or the one read_gguf makes); an option
    LanguageModel does not have is refused in one line."""
    kind = hf.get("model_type")
    if kind not in ("llama", "qwen2"):
        raise CheckpointError(f"config.json describes a {kind!r} model ({hf.get('architectures')}); "
                              "LanguageModel loads llama and qwen2 checkpoints")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (only silu, SwiGLU)")
    if hf.get("mlp_bias") or hf.get("use_sliding_window"):
        raise CheckpointError("config.json: mlp_bias and use_sliding_window are not supported")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})  # transformers 5 / 4 layouts
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if rope.get("partial_rotary_factor", 1.0) != 1.0 or hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError("partial_rotary_factor (RoPE on part of each head) is not supported")
    if rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = None
    try:
        return dict(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or 0, hidden_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6), max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=theta, rope_scaling=rope, tie_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=kind == "qwen2" or hf.get("attention_bias", False),
            o_bias=kind == "llama" and hf.get("attention_bias", False))
    except KeyError as e:
        raise CheckpointError(f"config.json lacks {e}") from None


def hf_lm_config(cfg: dict) -> dict:
    """The config.json that LanguageModel.save_pretrained writes for LMConfig's fields `cfg`: Llama's
    or Qwen2's if they can express it, else ours (model_type "glimpse_lm")."""
    if cfg["n_experts"] or cfg["nope_every"] or cfg["attention_chunk"] or (cfg["o_bias"] and not cfg["qkv_bias"]):
        return {"model_type": "glimpse_lm", **cfg}
    kind = "qwen2" if cfg["qkv_bias"] and not cfg["o_bias"] else "llama"
    hf = {"architectures": ["Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM"], "model_type": kind,
          "vocab_size": cfg["vocab_size"], "hidden_size": cfg["dim"], "intermediate_size": cfg["hidden_dim"],
          "num_hidden_layers": cfg["n_layers"], "num_attention_heads": cfg["n_heads"],
          "num_key_value_heads": cfg["n_kv_heads"], "head_dim": cfg["head_dim"], "hidden_act": "silu",
          "rms_norm_eps": cfg["norm_eps"], "max_position_embeddings": cfg["max_seq_len"],
          "rope_theta": cfg["rope_theta"], "rope_scaling": cfg["rope_scaling"],
          "tie_word_embeddings": cfg["tie_embeddings"]}
    if kind == "llama":
        hf["attention_bias"] = cfg["qkv_bias"]
    return hf


def vision_settings(hf: dict) -> dict:
    """VisionConfig's fields from a SigLIP, CLIP (full model or vision-only) or DINOv2 config.json;
    missing fields take the defaults of the HF config classes."""
    kind = hf.get("model_type")
    if kind in ("siglip", "clip"):
        hf = hf.get("vision_config") or {}
    elif kind in ("siglip_vision_model", "clip_vision_model"):
        kind = kind.split("_")[0]
    elif kind in ("smolvlm_vision", "idefics3_vision"):  # SmolVLM's tower is a SigLIP
        kind = "siglip"
    elif kind != "dinov2":
        raise CheckpointError(f"config.json describes a {kind!r} model; VisionTower loads siglip, clip and dinov2")
    act = activation_name(hf.get("hidden_act", {"siglip": "gelu_tanh", "clip": "quick_gelu", "dinov2": "gelu"}[kind]))
    if kind == "dinov2":
        if hf.get("use_swiglu_ffn"):
            raise CheckpointError("DINOv2 with a SwiGLU MLP (giant) is not supported")
        dim, ratio = hf.get("hidden_size", 768), hf.get("mlp_ratio", 4)
        if not (fits(dim, int) and fits(ratio, float)):
            raise CheckpointError(f"config.json: hidden_size and mlp_ratio must be numbers, not {dim!r} and {ratio!r}")
        return dict(
            family="dinov2", image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 14), dim=dim,
            n_layers=hf.get("num_hidden_layers", 12), n_heads=hf.get("num_attention_heads", 12),
            hidden_dim=int(dim * ratio), norm_eps=hf.get("layer_norm_eps", 1e-6),
            act=act, cls_token=True, layer_scale=True)
    clip = kind == "clip"
    return dict(
        family=kind, image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 32 if clip else 16),
        dim=hf.get("hidden_size", 768), n_layers=hf.get("num_hidden_layers", 12),
        n_heads=hf.get("num_attention_heads", 12), hidden_dim=hf.get("intermediate_size", 3072),
        norm_eps=hf.get("layer_norm_eps", 1e-5 if clip else 1e-6), act=act, cls_token=clip,
        patch_bias=not clip, pre_norm=clip, post_norm="cls" if clip else "all")


def blip2_name(name: str) -> str:
    """A BLIP-2 tensor name as transformers 5.24 and the hub's BLIP-2 checkpoints spell it. Also accepted: the
    InstructBLIP-style layout with the text embeddings and their LayerNorm under `qformer.embeddings`."""
    for old, new in (("qformer.embeddings.layernorm.", "qformer.layernorm."),
                     ("qformer.embeddings.word_embeddings.", "embeddings.word_embeddings."),
                     ("qformer.embeddings.position_embeddings.", "embeddings.position_embeddings."),
                     ("qformer.embeddings.position_ids", "embeddings.position_ids")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def bert_sizes(c: dict) -> dict:
    """QFormerConfig's sizes from a BERT-style config: BERT's own or BLIP-2's qformer_config (missing
    fields take bert-base-uncased's values, which transformers' Blip2QFormerConfig shares)."""
    return dict(dim=c.get("hidden_size", 768), n_layers=c.get("num_hidden_layers", 12),
                n_heads=c.get("num_attention_heads", 12), hidden_dim=c.get("intermediate_size", 3072),
                act=activation_name(c.get("hidden_act", "gelu")), norm_eps=c.get("layer_norm_eps", 1e-12),
                dropout=c.get("hidden_dropout_prob", 0.1), vocab_size=c.get("vocab_size", 30522),
                max_positions=c.get("max_position_embeddings", 512), pad_token_id=c.get("pad_token_id", 0) or 0)


def blip2_qformer_settings(hf: dict, names: set) -> dict:
    """QFormerConfig's fields from a BLIP-2 config.json (missing fields take the defaults of transformers' Blip2Config,
    Blip2QFormerConfig, Blip2VisionConfig); which optional parts there are (text side, projections, ITM
    head) from the checkpoint's tensor names, as the model classes differ in them, not the config."""
    q, v = hf.get("qformer_config") or {}, hf.get("vision_config") or {}
    has = lambda prefix: any(n.startswith(prefix) for n in names)
    return dict(
        **bert_sizes(q), n_queries=hf.get("num_query_tokens", 32),
        encoder_dim=v.get("hidden_size", 1408),  # Blip2Config sets the Q-Former's encoder_hidden_size so
        cross_attention_frequency=q.get("cross_attention_frequency", 2),
        text=has("embeddings.word_embeddings.") or has("qformer.encoder.layer.0.intermediate."),
        proj_dim=hf.get("image_text_hidden_size", 256) if has("vision_projection.") or has("text_projection.")
        else None,
        itm_head=has("itm_head."))


def bert_qformer_settings(hf: dict) -> dict:
    """QFormerConfig's fields, the text side's sizes, from a BERT or DistilBERT config.json (defaults:
    bert-base-uncased)."""
    if hf.get("model_type") not in ("bert", "distilbert"):
        raise CheckpointError(f"config.json describes a {hf.get('model_type')!r} model; QFormer.from_bert loads "
                              "bert and distilbert")
    sizes = bert_sizes(hf)
    if hf["model_type"] == "distilbert":  # most sizes under names of its own
        if hf.get("sinusoidal_pos_embds"):  # the table is still stored, but say so rather than guess
            raise CheckpointError("DistilBERT with sinusoidal position embeddings is not supported")
        sizes |= dict(dim=hf.get("dim", 768), n_layers=hf.get("n_layers", 6), n_heads=hf.get("n_heads", 12),
                      hidden_dim=hf.get("hidden_dim", 3072), act=activation_name(hf.get("activation", "gelu")),
                      norm_eps=1e-12, dropout=hf.get("dropout", 0.1))
    return dict(**sizes, text=True)


def bert_state(state: dict, kind: str) -> dict:
    """BERT's tensors as layouts.bert_key_map names them: no "bert." prefix (BertForPreTraining & co.), no
    gamma/beta (the old TF-converted files), token-type row 0 folded into the positions (from_bert)."""
    prefix = kind + "."
    if any(k.startswith(prefix) for k in state):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    state = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
             for k, v in state.items()}
    token_types = state.pop("embeddings.token_type_embeddings.weight", None)  # (2, D) in BERT
    if token_types is not None and "embeddings.position_embeddings.weight" in state:
        state["embeddings.position_embeddings.weight"] = state["embeddings.position_embeddings.weight"] \
            + token_types[0]  # (P, D)
    return state


