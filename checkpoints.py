"""Checkpoint files: the hub, JSON and safetensors in and out (atomic writes), GGUF, tokenizer,
preprocessor and image files, PEFT adapter files, and `load_state`, the one loader that every model's
`from_pretrained` calls.

Nothing here builds a model. Each module of the reading path builds its config from the fields that
configs.py reads (`lm_settings`, `vision_settings`, ...), keeps its own key map (checkpoint tensor
name -> its own name) and hands both to `load_state`, which builds the model, checks every name and
shape, and names the missing and unexpected tensors in one `CheckpointError` line. This file imports
nothing from the reading path: every other file may import it.
"""

import json
import os
import re
from copy import deepcopy
from dataclasses import asdict

import gguf
import numpy as np
import safetensors
import safetensors.torch
import tokenizers
import torch
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
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{where}: {name} holds NaN or infinite values; the checkpoint is damaged")
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
    try:
        backend = tokenizers.Tokenizer.from_file(tokenizer_file)
    except Exception as e:  # tokenizers raises its own Exception for any file it cannot parse
        raise CheckpointError(f"{tokenizer_file}: not a tokenizer the tokenizers library can read ({e})") from None
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
                names[role] = token.get("content") if isinstance(token, dict) else token
                if not isinstance(names[role], str):
                    raise CheckpointError(f"{folder}/{file}: {role}_token must be a token string, not {token!r}")
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
    """processing.ImageProcessor (or layouts.SmolVLMImageProcessor, with `smolvlm`) from a checkpoint's
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
