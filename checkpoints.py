"""Reference shelf (a first reading may skip this file): checkpoint I/O — the hub, JSON and safetensors
in and out (atomic writes), config checks, transformers' config.json fields as ours, GGUF, tokenizer,
preprocessor and image files, PEFT adapter files, and `load_state`, the one loader that every
model's `from_pretrained` calls.

Nothing here builds a model. Each module of the reading path builds its config from the fields read
here (`lm_settings`, `vision_settings`, ...), keeps its own key map (checkpoint tensor name -> its
own name) and hands both to `load_state`, which builds the model, checks every name and shape, and
names the missing and unexpected tensors in one `CheckpointError` line. This file imports nothing
from the reading path: every other file may import it.
"""

import json
import os
import re
import typing
from copy import deepcopy
from dataclasses import asdict, fields, is_dataclass

import gguf
import numpy as np
import safetensors
import safetensors.torch
import tokenizers
import torch
import torch.nn.functional as F
from huggingface_hub import snapshot_download
from PIL import Image, ImageOps
from tokenizers import AddedToken, decoders, models, pre_tokenizers

# ---------------------------------------------------------------------------------------------
# A local folder or a hub download
# ---------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint or file that cannot be loaded; the message is one line naming the problem."""


# What a hub download fetches: a model's weights, or a tokenizer and what names its special tokens.
WEIGHT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
                   "chat_template.jinja")


def checkpoint_folder(name_or_path: str, patterns) -> str:
    """A local folder as it is, or a hub id ("org/name") downloaded into the HF cache, only the
    files matching `patterns`, with a progress bar."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return path
    # Not a hub id but a missing local folder: a file, anything but "org/name" in the characters hub
    # ids use (an absolute or ./ path, a space, more parts), or a name under a local folder ("runs/nope").
    hub_id = re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+", path)
    if os.path.exists(path) or not hub_id or os.path.isdir(path.split("/")[0]):
        raise CheckpointError(f"{name_or_path}: no such folder (and not a hub id like 'org/name')")
    try:
        return snapshot_download(name_or_path, allow_patterns=list(patterns))
    except Exception as e:  # offline, no such repository, gated, HTTP error: all end here
        raise CheckpointError(f"could not get {name_or_path} from the Hugging Face hub and it is not cached "
                              f"({type(e).__name__}); pass a local folder instead") from None


# ---------------------------------------------------------------------------------------------
# JSON and safetensors, in and out; a write goes to a temporary name, then is renamed into place
# ---------------------------------------------------------------------------------------------


def read_json(path: str, default: dict | None = None) -> dict:
    """The JSON object in `path`; `default` (or an error if None) when there is no such file."""
    if not os.path.isfile(path):
        if default is not None:
            return default
        raise CheckpointError(f"{path}: missing")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object {{...}}, got a {type(obj).__name__}")
    return obj


def read_safetensors(folder: str, keep=None) -> dict:
    """The tensors of a folder's model.safetensors, or of the shards its index names; with `keep`
    (a test on the name) only those tensors are read, and only the shards that hold them opened:
    the vision half of a SigLIP checkpoint, the Q-Former of a BLIP-2 one."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index)["weight_map"]
        files = sorted({f for k, f in weight_map.items() if keep is None or keep(k)})
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: shard named in the index is missing")
        try:
            with safetensors.safe_open(path, "pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)})
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt? ({e})") from None
    return state


def write_json(obj: dict, path: str):
    """Write to a temporary name, then rename: a crash never leaves half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def write_safetensors(state: dict, path: str):
    """Like write_json: a temporary file renamed into place."""
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    safetensors.torch.save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)


def write_checkpoint(folder: str, config: dict, state: dict):
    """What every save_pretrained writes: config.json and model.safetensors, each written whole or not at all."""
    os.makedirs(folder, exist_ok=True)
    write_json(config, os.path.join(folder, "config.json"))
    write_safetensors(state, os.path.join(folder, "model.safetensors"))


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


def check_side(name: str, side) -> None:
    """A side in pixels from a config: a whole number from 1 to MAX_IMAGE_SIDE."""
    if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_IMAGE_SIDE:
        raise ValueError(f"{name} must be a whole number of pixels from 1 to {MAX_IMAGE_SIDE} "
                         f"(checkpoints.MAX_IMAGE_SIDE), not {side!r}")


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
    """BERT's tensors as qformer.bert_key_map names them: no "bert." prefix (BertForPreTraining & co.), no
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


# ---------------------------------------------------------------------------------------------
# The one loader
# ---------------------------------------------------------------------------------------------


def load_state(model_cls, cfg, state: dict, key_map: dict | None, dtype, device, where: str, ignore=(),
               reshaped=(), fresh: bool = False):
    """model_cls(cfg) filled from `state` (checkpoint name -> tensor), in eval mode: what every
    `from_pretrained` ends with.

    `key_map` maps each checkpoint name to our name (or a tuple of our names: one tensor may fill
    several); None means the checkpoint already has our names, all of them. Every name of the map
    must be in the checkpoint, and every checkpoint tensor in the map or under a prefix in `ignore`;
    the missing and unexpected ones are named in one CheckpointError line. Then every shape is
    checked; a name in `reshaped` may come in another shape of the same size (DINOv2 keeps (1, P, D)).

    The model is built on the meta device (no random init, no memory) and takes the checkpoint's
    tensors as they are. With `fresh` it is built for real, and what the map does not fill keeps its
    fresh initialisation (a Q-Former started from BERT).
    """
    if fresh:
        model = model_cls(cfg)
    else:
        with torch.device("meta"):
            model = model_cls(cfg)
    expected = model.state_dict()
    if key_map is None:
        key_map = {name: name for name in expected}
    missing = sorted(set(key_map) - set(state))
    unexpected = sorted(k for k in set(state) - set(key_map) if not k.startswith(tuple(ignore)))
    if missing or unexpected:
        raise CheckpointError(f"{where}: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                              f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    ours = {}
    for name, targets in key_map.items():
        for mine in (targets,) if isinstance(targets, str) else targets:
            t, shape = state[name], expected[mine].shape
            if name in reshaped and t.numel() == expected[mine].numel():
                t = t.reshape(shape)  # e.g. (1, P, D) -> (P, D)
            if t.shape != shape:
                raise CheckpointError(f"{where}: {name}: checkpoint shape {tuple(t.shape)}, "
                                      f"model expects {tuple(shape)}")
            ours[mine] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)  # BatchNorm counts stay ints
    if fresh:
        model.load_state_dict(ours, strict=False)
        return model.to(device=device, dtype=dtype).eval()
    model.load_state_dict(ours, assign=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# llama.cpp's GGUF files: a Llama or Qwen2 LM as a transformers checkpoint, and its tokenizer
# ---------------------------------------------------------------------------------------------

# GGUF tensor names -> transformers' (convert_hf_to_gguf.py's table read backwards)
GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
GGUF_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj"}


def read_gguf(path: str) -> tuple[dict, dict]:
    """The config.json and the float32 tensors, under transformers' names, of a llama.cpp GGUF file of
    a Llama or Qwen2 model: a checkpoint that LanguageModel reads like any other.

    Tensors are dequantized with the `gguf` package; llama.cpp's converter permuted the rows of
    q and k for its interleaved RoPE (`convert_hf_to_gguf.py: LlamaModel.permute`), which we undo
    to get back HF's rotate_half layout."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (llama and qwen2 are)")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{path}: GGUF rope_freqs (Llama-3.1 rope scaling) is not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise CheckpointError(f"{path}: GGUF rope scaling {scaling!r} is not supported (none and linear are)")
    try:
        n_heads = meta[f"{arch}.attention.head_count"]
        n_kv_heads = meta.get(f"{arch}.attention.head_count_kv") or n_heads
        config = {
            "model_type": arch, "vocab_size": meta.get(f"{arch}.vocab_size") or len(tensors["token_embd.weight"].data),
            "hidden_size": meta[f"{arch}.embedding_length"], "num_hidden_layers": meta[f"{arch}.block_count"],
            "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
            "head_dim": meta.get(f"{arch}.attention.key_length"),
            "intermediate_size": meta[f"{arch}.feed_forward_length"],
            "rms_norm_eps": meta[f"{arch}.attention.layer_norm_rms_epsilon"],
            "max_position_embeddings": meta[f"{arch}.context_length"],
            "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
            "rope_scaling": {"rope_type": "linear", "factor": meta[f"{arch}.rope.scaling.factor"]}
            if scaling == "linear" else None,
            "tie_word_embeddings": "output.weight" not in tensors}
    except KeyError as e:
        raise CheckpointError(f"{path}: GGUF metadata lacks {e}") from None
    state = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
        hf = f"model.layers.{m[1]}.{GGUF_LAYER_NAMES.get(m[2], m[2])}.{m[3]}" if m else GGUF_NAMES.get(name, name)
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = torch.from_numpy(w)  # float32, whatever the file's quantization
        w = w.reshape(tuple(reversed([int(d) for d in t.shape])))  # GGUF lists dims innermost first
        if arch == "llama" and m and m[2] in ("attn_q", "attn_k"):
            heads = n_heads if m[2] == "attn_q" else n_kv_heads
            w = w.reshape(heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # undo the permute
        state[hf] = w
    return config, state


# How a byte-level BPE GGUF splits text before the merges run, by its `tokenizer.ggml.pre` name
# (the `regex_exprs` in llama.cpp's llama-vocab.cpp). `ByteLevel(use_regex=True)` is GPT-2's split
# followed by GPT-2's mapping of bytes to printable characters; "smollm" and its kin first cut
# every digit apart (llama.cpp's `\p{N}`), as SmolLM's tokenizer.json does.
def _gpt2_split():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


GGUF_PRE_TOKENIZERS = {"smollm": _digits_then_gpt2_split, "starcoder": _digits_then_gpt2_split,
                       "refact": _digits_then_gpt2_split, "gpt-2": _gpt2_split}

# llama.cpp's token types (`tokenizer.ggml.token_type`): CONTROL tokens like <|im_start|> and
# USER_DEFINED ones are matched whole, never cut into pieces, so they become added special tokens.
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4


def read_gguf_tokenizer(path: str) -> tuple:
    """(backend, bos, eos, pad, chat_template) of the tokenizer a GGUF file describes in its
    `tokenizer.*` metadata. Only byte-level BPE (`tokenizer.ggml.model` "gpt2", as GPT-2 and SmolLM
    use) is supported: the vocabulary and merges go into a BPE model, split and decoded byte-level
    (mirrors transformers' GGUF tokenizer conversion and llama.cpp's llama-vocab.cpp)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such GGUF file")
    fields = gguf.GGUFReader(path).fields

    def read(key, default=None):
        return fields[key].contents() if key in fields else default

    model_type = read("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(f"{path} has tokenizer model {model_type!r}; only byte-level BPE ('gpt2') "
                         "GGUF tokenizers are supported, use a folder with tokenizer.json instead")
    pre = read("tokenizer.ggml.pre", "gpt-2")  # files from before `tokenizer.ggml.pre` get GPT-2's split
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{path} has pre-tokenizer {pre!r}; supported: {sorted(GGUF_PRE_TOKENIZERS)}")
    if "tokenizer.ggml.merges" not in fields:  # llama.cpp refuses these too
        raise ValueError(f"{path} has no tokenizer.ggml.merges, which a byte-level BPE tokenizer needs")
    tokens = read("tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ")) for merge in read("tokenizer.ggml.merges")]
    backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, kind in zip(tokens, read("tokenizer.ggml.token_type"))
                                if kind in (GGUF_CONTROL, GGUF_USER_DEFINED)])

    def token(role):
        token_id = read(f"tokenizer.ggml.{role}_token_id")
        return tokens[token_id] if token_id is not None else None

    return backend, token("bos"), token("eos"), token("padding"), read("tokenizer.chat_template")


# ---------------------------------------------------------------------------------------------
# Tokenizer and image-processor files of a transformers checkpoint
# ---------------------------------------------------------------------------------------------


def read_tokenizer(name_or_path: str) -> tuple:
    """(backend, bos, eos, pad, chat_template) from a `.gguf` file, or from a folder or hub id with a
    tokenizer.json, bos/eos/pad named by tokenizer_config.json, else special_tokens_map.json, else
    config.json's token ids (only the tokenizer files are downloaded)."""
    path = os.path.expanduser(name_or_path)
    if path.endswith(".gguf"):
        return read_gguf_tokenizer(path)
    if os.path.isfile(path):
        raise CheckpointError(f"{path}: expected a folder with tokenizer.json or a .gguf file")
    folder = checkpoint_folder(name_or_path, TOKENIZER_FILES)
    tokenizer_file = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        raise CheckpointError(f"{folder}: no tokenizer.json")
    backend = tokenizers.Tokenizer.from_file(tokenizer_file)
    names = {}  # "bos" -> "<|im_start|>"; later files override earlier ones
    model_config = read_json(os.path.join(folder, "config.json"), {})
    for role in ("bos", "eos", "pad"):
        token_id = model_config.get(f"{role}_token_id")
        if isinstance(token_id, list):  # some models list several EOS ids; the first is the main one
            token_id = token_id[0]
        if token_id is not None:
            names[role] = backend.id_to_token(token_id)
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        config = read_json(os.path.join(folder, file), {})
        for role in ("bos", "eos", "pad"):
            token = config.get(f"{role}_token")
            if token is not None:  # a string, or {"content": ...} in older files
                names[role] = token["content"] if isinstance(token, dict) else token
    chat_template = read_json(os.path.join(folder, "tokenizer_config.json"), {}).get("chat_template")
    template_file = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as f:
            chat_template = f.read()
    return backend, names.get("bos"), names.get("eos"), names.get("pad"), chat_template


def write_tokenizer(folder: str, backend, bos: str | None, eos: str | None, pad: str | None, chat_template):
    """tokenizer.json, and a tokenizer_config.json naming bos/eos/pad and the chat template."""
    os.makedirs(folder, exist_ok=True)
    backend.save(os.path.join(folder, "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "chat_template": chat_template}
    write_json(config, os.path.join(folder, "tokenizer_config.json"))


# Normalization constants (transformers' image_utils.py).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# What transformers' PIL image processors use for the keys a preprocessor_config.json leaves out:
# the class attributes of models/siglip/image_processing_pil_siglip.py, models/clip/
# image_processing_pil_clip.py and models/bit/image_processing_pil_bit.py (DINOv2 checkpoints name
# BitImageProcessor). All three also default to bicubic resizing and rescale, normalize, RGB on.
CLIP_DEFAULTS = {"size": {"shortest_edge": 224}, "do_center_crop": True,
                 "crop_size": {"height": 224, "width": 224},
                 "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD}
IMAGE_PROCESSOR_DEFAULTS = {
    "SiglipImageProcessor": {"size": {"height": 224, "width": 224}, "do_center_crop": False,
                             "image_mean": IMAGENET_STANDARD_MEAN, "image_std": IMAGENET_STANDARD_STD},
    "CLIPImageProcessor": CLIP_DEFAULTS,
    "BitImageProcessor": CLIP_DEFAULTS,
}
SMOLVLM_IMAGE_PROCESSORS = ("SmolVLMImageProcessor", "Idefics3ImageProcessor")  # their defaults are the class's


def load_image_processor(cls, name_or_path: str, smolvlm: bool = False):
    """processing.ImageProcessor (or SmolVLMImageProcessor, with `smolvlm`) from a checkpoint's
    preprocessor_config.json, in a local folder or a hub id (only that file is downloaded).

    The class is named as transformers' AutoImageProcessor finds it: older files only name a feature
    extractor, files saved by transformers 4's fast processors end in "Fast". The file's keys that
    are fields of cls override the defaults (a null one is left out, so it takes the default, as in
    transformers); a bad setting is a CheckpointError naming the file."""
    folder = checkpoint_folder(name_or_path, ["preprocessor_config.json"])
    path = os.path.join(folder, "preprocessor_config.json")
    config = read_json(path)
    kind = config.get("image_processor_type") or (config.get("feature_extractor_type") or "").replace(
        "FeatureExtractor", "ImageProcessor")
    kind = kind.removesuffix("Fast")
    if smolvlm and kind not in SMOLVLM_IMAGE_PROCESSORS:
        raise CheckpointError(f"{path}: image processor {kind!r} is not a SmolVLM one "
                              f"{SMOLVLM_IMAGE_PROCESSORS}; use ImageProcessor")
    if not smolvlm and kind not in IMAGE_PROCESSOR_DEFAULTS:
        hint = "; use SmolVLMImageProcessor" if kind in SMOLVLM_IMAGE_PROCESSORS else ""
        raise CheckpointError(f"{path}: image processor {kind!r} is not supported; "
                              f"supported: {sorted(IMAGE_PROCESSOR_DEFAULTS)}{hint}")
    settings = {k: v for k, v in config.items() if k in cls.__dataclass_fields__ and v is not None}
    try:
        return cls(**deepcopy({**IMAGE_PROCESSOR_DEFAULTS.get(kind, {}), **settings}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def write_image_processor(processor, folder: str):
    """A preprocessor_config.json for processing.ImageProcessor that load_image_processor reads back."""
    kind = "SiglipImageProcessor" if "height" in processor.size else "CLIPImageProcessor"
    config = {"image_processor_type": kind, **asdict(processor), "resample": int(processor.resample)}
    write_json(config, os.path.join(folder, "preprocessor_config.json"))


# ---------------------------------------------------------------------------------------------
# Image files: decoded whole, upright and RGB, within a pixel limit (processing.load_image opens them)
# ---------------------------------------------------------------------------------------------

# A small file can claim a size that takes gigabytes to decode (a "decompression bomb"): images over
# this many pixels are refused from their header. Pillow's Image.MAX_IMAGE_PIXELS is a second net.
MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """An image that cannot be loaded; the message is one line naming the file and the problem."""


def decode_image(image: Image.Image, name: str) -> Image.Image:
    """Check the header's size, decode, apply the EXIF orientation, convert any mode to RGB, with
    transparency on white (transformers' image_transforms.convert_to_rgb)."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: {width}x{height} is {width * height:,} pixels, over the limit of "
                         f"{MAX_PIXELS:,} (checkpoints.MAX_PIXELS)")
    image.load()  # decode it all now: a truncated file fails here, not halfway through a batch
    image = ImageOps.exif_transpose(image)  # always a new image, so the file can be closed
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # to 8 bits (Pillow's convert clips at 255)
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))  # (H, W)
        if image.mode != "F":
            pixels = pixels / 257  # 16-bit: 65535 -> 255
        elif pixels.max(initial=0) <= 1:
            pixels = pixels * 255  # floats in [0, 1]; else already 0..255
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))  # (H, W) mode L
    try:
        if image.has_transparency_data:  # RGBA, LA, PA, a palette's or a color's "transparency"
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        return image.convert("RGB")
    except ValueError as e:  # e.g. "conversion from La to L not supported"
        raise ImageError(f"{name}: unsupported image mode {image.mode} ({e})") from None


# ---------------------------------------------------------------------------------------------
# PEFT's LoRA adapter files: adapter_config.json + adapter_model.safetensors
# ---------------------------------------------------------------------------------------------

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel).model (the transformers model)
# adapter_config.json options that change the math; lora.py refuses a file that turns any of them on
UNSUPPORTED = ("use_dora", "use_rslora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
               "layers_to_transform", "layer_replication", "exclude_modules", "modules_to_save",
               "target_parameters", "trainable_token_indices")


def read_adapter(folder: str) -> tuple[dict, dict]:
    """(config, weights) of a PEFT LoRA adapter folder, refused in one line if it is not plain LoRA."""
    cfg = read_json(os.path.join(folder, ADAPTER_CONFIG))
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder}: peft_type {cfg.get('peft_type')!r}, lora.py reads LORA adapters")
    for option in UNSUPPORTED:
        if cfg.get(option):
            raise CheckpointError(f"{folder}: {option}={cfg[option]!r} is not supported by lora.py")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{folder}: bias={cfg['bias']!r} is not supported by lora.py")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} lacks {key!r}")
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (lora.py reads safetensors adapters, not adapter_model.bin)")
    try:
        return cfg, safetensors.torch.load_file(path)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt? ({e})") from None


def write_adapter(folder: str, state: dict, r: int, alpha: float, dropout: float, targets: list, base: str | None):
    """The two files of a PEFT adapter, each written to a temporary name and renamed into place: the
    weights, and a LoraConfig with these settings (PEFT's defaults for the rest)."""
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": r,
              "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "modules_to_save": None, "inference_mode": True}
    os.makedirs(folder, exist_ok=True)
    write_safetensors(state, os.path.join(folder, ADAPTER_WEIGHTS))
    write_json(config, os.path.join(folder, ADAPTER_CONFIG))
