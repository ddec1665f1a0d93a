"""Training: one script, one phase per flag, pure PyTorch.

    python train.py --phase pretrain --preset tiny                       # the LM from scratch on text
    python train.py --phase instruct --preset tiny --init runs/tiny-pretrain   # tower, connector + LM (or LoRA)
    python train.py --phase dpo      --preset tiny --init runs/tiny-instruct   # preference tuning
    torchrun --nproc_per_node 2 train.py --phase instruct ...           # the same under DDP

In reading order: the settings (TrainConfig), the model a phase starts from, what trains and how fast,
batches and objectives, the phase table (PHASES), the loop (`train`). Settings, later ones winning:
TrainConfig's defaults, the preset (presets.py), its phase, --config FILE.toml, the command line.
runs.py holds the run folder (log, ckpt-STEP/ written whole, `latest`, exact --resume); parallel.py DDP and FSDP.
"""
import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from checkpoints import CheckpointError, read_json
from cli import fail, latest_checkpoint, print_table, resolve, retrieval_report
from dpo import dpo_step, logit_positions, reference_logprobs, token_logprobs
from autotune import faster_dtype
from lora import apply_lora, load_adapter
from model import LanguageModel, LMConfig
from parallel import (all_sum, held_mib, recompute_activations, setup_distributed, shard,
                      sharded_optimizer_loader, sharded_state, wrap)
from plots import plot_losses
from presets import PRESETS
from processing import ImageProcessor, Special, Tokenizer
from qformer import QFormerConfig, itc_loss, similarity
from runs import (STOP_SIGNALS, catch_stop_signals, check_run, dpo_reference, load_data, load_settings,
                  load_trainer_state, lock_run, log_step, open_log, quiet_sigterm, release_stop_signals,
                  save_checkpoint, say_start)
from siglip import VisionConfig, VisionTower
from vlm import VLM, VLMConfig


@dataclass
class TrainConfig:
    phase: str = "instruct"
    preset: str = "tiny"
    out: str = ""  # the run folder; default runs/PRESET-PHASE
    init: str = ""  # checkpoint of the phase before (or any LM/VLM checkpoint)
    resume: bool = False
    # The model, unless --init: "tiny" (the preset's from-scratch config), a hub id, a folder or (LM) a .gguf file
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
    dtype: str = "auto"  # auto: bf16 autocast on GPUs that support it; on CPU where a step measures >5% faster
    compile: bool = False
    fsdp: bool = False  # under torchrun: parameters, gradients and AdamW's state sharded (parallel.py)
    activation_checkpointing: bool = False  # blocks recompute their activations in the backward: less memory
    device: str = "auto"
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    stop_after: int = 0  # end this invocation after N steps (a checkpoint is saved), e.g. for time-limited jobs


# ---------------------------------------------------------------------------------------------
# The model a phase starts from: a checkpoint, or a tower and an LM joined by a new connector
# ---------------------------------------------------------------------------------------------


def start_model(cfg: TrainConfig, spec: dict, train_set: list):
    """(model, tokenizer, image_processor) a phase starts from: the --init checkpoint (a run folder: its
    newest), else the settings' tower and LM (pretrained, or from scratch with `spec`'s configs and a
    tokenizer learned from spec["tokenizer_data"], else from `train_set`) joined by a new connector."""
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
    else:  # the preset's tokenizer, or one learned from its tokenizer_data, else from the training samples
        tokenizer = Tokenizer.from_pretrained(spec["tokenizer"]) if "tokenizer" in spec else data.train_tokenizer(
            data.load_source(spec["tokenizer_data"], "train") if "tokenizer_data" in spec else train_set,
            spec.get("tokenizer_vocab", 512), spec.get("tokenizer_lowercase", False))
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
        source = resolve(cfg.vision)
        vision, processor = VisionTower.from_pretrained(source), ImageProcessor.from_pretrained(source)
    if cfg.image_size:  # a smaller input than the tower's own, e.g. for a fast CPU run
        processor = replace(processor, size={"height": cfg.image_size, "width": cfg.image_size},
                            do_center_crop=False, crop_size=None)
    qformer = None
    if cfg.connector == "qformer":  # BLIP-2's Q-Former, from scratch, reading text with the LM's tokenizer
        qformer = QFormerConfig(**{**spec.get("qformer_config", {}), "itm_head": cfg.itm},
                                encoder_dim=vision.config.dim, vocab_size=tokenizer.vocab_size,
                                pad_token_id=tokenizer.pad_id or 0)
    torch.manual_seed(cfg.seed)
    vlm_cfg = VLMConfig(vision=vision.config, lm=lm.config, connector=cfg.connector, scale_factor=cfg.scale_factor,
                        image_token_id=tokenizer.token_to_id("<image>"), vision_layer=cfg.vision_layer,
                        image_size=data.processor_size(processor), qformer=qformer)
    return VLM.join(vision, lm, vlm_cfg), tokenizer, processor


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


@dataclass
class Setup:
    """What a phase's batches are made with, besides the samples."""
    cfg: TrainConfig
    model: torch.nn.Module  # the model itself, never its DDP wrapper
    tokenizer: Tokenizer
    processor: ImageProcessor | None  # None: a language model
    reference: torch.nn.Module | None  # DPO's frozen reference; None: the policy with its LoRA adapters off
    device: torch.device
    bf16: bool  # autocast to bfloat16 (--dtype; auto: on GPUs that support it, on CPU where measured faster)
    features: data.KeptFeatures | None = None  # chat batches carry image_features in place of pixel_values

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
    qformer = model.connector.qformer
    with torch.no_grad():
        features = model.vision(batch["pixel_values"], layer=model.config.vision_layer)  # (B, P, Dv)
        qformer.temp.clamp_(0.001, 0.5)  # as BLIP-2 does before each step: the parameter stays in range
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
        model, tokenizer, processor = start_model(replace(cfg, init=resume_from or cfg.init), spec, train_set)
        model = set_trainable(model, cfg)
        if resume_from and any("lora_" in n for n, _ in model.named_parameters()):
            load_adapter(model, resume_from)
        separate = cfg.phase == "dpo" and not cfg.lora_r  # DPO's reference (with LoRA: the policy, adapters off)
        reference = VLM.from_pretrained(dpo_reference(cfg), device=device).requires_grad_(False) if separate else None
    except (CheckpointError, OSError, ValueError) as e:
        fail(e)
    recompute_activations(model, cfg.activation_checkpointing)
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if cfg.fsdp:  # before .to(device): fully_shard moves each process's shards, not the whole model, to its device
        shard(model, device, bf16)
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.95))
    loader = sharded_optimizer_loader(model, optimizer) if cfg.fsdp else None  # each process reads its own shard
    start = load_trainer_state(resume_from, optimizer, loader) if resume_from else 0
    frozen = isinstance(model, VLM) and not any(p.requires_grad for p in model.vision.parameters())
    keep = cfg.keep_features and frozen and cfg.phase in ("align", "instruct") and not cfg.fsdp  # tower once an image
    features = data.KeptFeatures(model) if keep else None
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


def measured_dtype(s: Setup, train_set: list, is_main: bool) -> bool:
    """--dtype auto on CPU: bfloat16 if a micro batch's step measures >5% faster in it (autotune.faster_dtype), in eval
    mode (no BatchNorm statistics move) and with features, if kept, in a cache of the trial's own."""
    phase, trial = PHASES[s.cfg.phase], replace(s, features=data.KeptFeatures(s.model) if s.features else None)
    batch = phase.batch(train_set[:s.cfg.micro_batch], trial)
    s.model.eval()
    return faster_dtype(s.model, lambda: phase.objective(s.model, batch, s.cfg)[0], say=is_main).name == "bfloat16"


def train(cfg: TrainConfig, spec: dict):
    """One phase: per step, the micro batches' summed losses backpropagated, divided by the count over all micro
    batches and processes, clipped, one AdamW step; validation and checkpoints as set, at the end, on Ctrl-C."""
    rank, world, device = setup_distributed(cfg)
    is_main = rank == 0
    lock = lock_run(cfg.out) if is_main else None  # noqa: F841  held until this process ends
    resume_from = check_run(cfg, spec, world)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_set, val_set, skipped = load_data(cfg)  # (an unreadable source: one line, from main)
    s, optimizer, start = prepare(cfg, spec, train_set, resume_from, device)
    if cfg.dtype == "auto" and device.type == "cpu":
        s.bf16 = measured_dtype(s, train_set, is_main)
    cfg = s.cfg = replace(cfg, dtype="bfloat16" if s.bf16 else "float32")  # what ran, for --resume
    phase, model = PHASES[cfg.phase], s.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    if is_main:
        say_start(cfg, model, len(train_set), skipped, world, device, s.features is not None)
    ddp = wrap(model, cfg, world)
    step_model = torch.compile(ddp) if cfg.compile else ddp
    log = open_log(cfg.out, start) if is_main else None
    stopped = catch_stop_signals()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not is_main, desc=cfg.phase)
    train_mode(model)
    done, t0 = 0, time.perf_counter()
    for step in bar:
        if cfg.stop_after and step == start + cfg.stop_after:
            break
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, cfg)
        mine = data.global_batch(len(train_set), step, cfg)[rank::world]  # this process's share
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
        signum = int(all_sum(stopped(), world, device, dist.ReduceOp.MAX))  # all stop after the same step
        last = step + 1 == cfg.steps or step + 1 == start + cfg.stop_after or bool(signum)
        if is_main:
            log_step(bar, log, row)
        if (step + 1) % cfg.save_every == 0 or last:
            state = sharded_state(model, optimizer, f"{cfg.out}/ckpt-{step + 1}.shards") if cfg.fsdp else None
            if is_main:
                save_checkpoint(cfg.out, step + 1, model, s.tokenizer, s.processor, optimizer, cfg, state)
                plot_losses(cfg.out)
        if signum:
            print(f"\n{STOP_SIGNALS[signum]} at step {step + 1}; --resume continues", file=sys.stderr)
            sys.exit(128 + signum)
    release_stop_signals()
    if is_main:
        log.close()
        print(f"done: {cfg.out}/{os.path.basename(latest_checkpoint(cfg.out))} (loss curve: {cfg.out}/loss.png); "
              f"parameters and AdamW state in this process: {held_mib(model, optimizer):,.1f} MiB")
        if cfg.phase == "qformer":  # the retrieval table and the similarity grid, on held-out images
            held_out = data.load_source(cfg.val_data or cfg.data, "test", limit=500)
            print_table(retrieval_report(model, s.tokenizer, s.processor, held_out, cfg.out))
    if world > 1:
        dist.barrier()  # every process leaves together: a rank still writing would hang in a torn-down group
        dist.destroy_process_group()


def main(argv=None):
    quiet_sigterm()  # before the loop catches it: one line, no traceback
    try:
        cfg, spec = load_settings(TrainConfig, PRESETS, PHASES, argv)
        train(cfg, spec)
    except KeyboardInterrupt:  # before the first step: nothing to save
        print("\ninterrupted before training started", file=sys.stderr)
        sys.exit(130)
    except (OSError, ValueError) as e:  # a source that cannot be read, a sample --max-len cannot hold, ...
        fail(e)


if __name__ == "__main__":
    main()
