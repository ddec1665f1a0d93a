"""train.py's runs: the presets (whole recipes), settings (defaults < preset < preset phase < --config
FILE.toml < flags, and what --resume keeps), the checks before anything loads, the
training samples (every local image checked, hub streams cut to size), and the run folder: its lock,
its log, checkpoints written whole or not at all, Ctrl-C (its loss plot is drawn by plots.py).
"""

import argparse
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tomllib

import torch
from safetensors import SafetensorError

import data
from checkpoints import CheckpointError, ImageError, read_json, write_json
from cli import ArgumentParser, fail, latest_checkpoint
from lora import save_adapter
from processing import CHAT_TEMPLATES, load_image
from sources import DataError
from vlm import CONNECTORS

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
    changed = sorted(k for k, v in given.items() if k not in ("resume", "steps", "stop_after", "out")
                     and getattr(saved, k) != v and not (k == "dtype" and v == "auto"))  # auto: as it chose
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
# train.py's run: the checks before anything loads (processes: parallel.py)
# ---------------------------------------------------------------------------------------------


def check_run(cfg, spec: dict, world: int) -> str | None:
    """What a run needs before anything loads, each refused in one line. Returns the checkpoint that
    --resume continues (None for a new run)."""
    share = cfg.batch_size // world
    if cfg.batch_size % world or (share > cfg.micro_batch and share % cfg.micro_batch):
        fail(f"batch_size {cfg.batch_size} must split evenly over {world} processes and their micro batches")
    if os.path.isdir(os.path.join(cfg.out, "latest")):
        fail(f"{cfg.out}/latest is a folder; it must be the file that names the newest checkpoint: move it away")
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
    if cfg.init and not cfg.resume:
        check_start(cfg, spec)
    return latest_checkpoint(cfg.out) if cfg.resume else None


def check_start(cfg, spec: dict):
    """--init fits the phase, from its config.json alone: DPO tunes a VLM (an instruct run) with this
    preset's tower and LM; the qformer phase starts from a tower or an LM, never another connector."""
    init = latest_checkpoint(cfg.init) or cfg.init
    try:
        found = read_json(os.path.join(init, "config.json"), {}) if os.path.isdir(init) else {}
    except CheckpointError as e:
        fail(e)
    if cfg.phase == "dpo" and found.get("model_type") != "glimpse_vlm":
        fail(f"the dpo phase tunes a vision-language model: --init an instruct run (runs/{cfg.preset}-instruct); "
             f"{cfg.init} is {'a language model' if found else 'not a checkpoint train.py wrote'}")
    if found.get("model_type") != "glimpse_vlm":
        return
    if cfg.phase == "qformer" and found.get("connector") != "qformer":
        fail(f"the qformer phase trains a new Q-Former: --init {cfg.init} already has a {found.get('connector')} "
             "connector; start from a pretrain run (an LM) or without --init")
    wanted = {"vision": spec.get("vision_config") if cfg.vision == "tiny" else None,
              "lm": spec.get("lm_config") if cfg.lm == "tiny" else None}
    for part, config in wanted.items():  # a from-scratch preset: the same widths and depths
        have = {k: found.get(part, {}).get(k) for k in ("dim", "n_layers")}
        if config and have != {k: config.get(k) for k in have}:
            fail(f"--init {cfg.init} has a {part} of {have}, not the {cfg.preset} preset's "
                 f"{ {k: config.get(k) for k in have} }: --init a run of this preset, or pass its --preset")


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


def base_state_dict(weights: dict) -> dict:
    """A LoRA model's weights without the adapters, under the names it has without LoRA
    (…q_proj.base.weight -> …q_proj.weight): what save_pretrained writes beside the adapter files."""
    return {k.replace(".base.", "."): v for k, v in weights.items() if ".lora_" not in k}


def dpo_reference(cfg) -> str:
    """The checkpoint a DPO run's frozen reference loads: --init's newest when the run starts, recorded
    with its weights' SHA-256 in the run's reference.json; a resumed run loads that very checkpoint,
    and refuses, in one line, one that has moved or changed since (its DPO would differ)."""
    record = os.path.join(cfg.out, "reference.json")
    if not cfg.resume or not os.path.isfile(record):
        path = os.path.abspath(latest_checkpoint(cfg.init) or cfg.init)
        os.makedirs(cfg.out, exist_ok=True)
        write_json({"path": path, "sha256": weights_sha256(path)}, record)
        return path
    kept = read_json(record)
    if not os.path.isdir(kept["path"]) or weights_sha256(kept["path"]) != kept["sha256"]:
        raise ValueError(f"this DPO run's reference {kept['path']} has moved or changed since it started "
                         "(reference.json); resuming against another reference would train another run")
    return kept["path"]


def weights_sha256(folder: str) -> str:
    """SHA-256 of a checkpoint's weight files, in name order."""
    digest = hashlib.sha256()
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
        with open(os.path.join(folder, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def save_checkpoint(run: str, step: int, model, tokenizer, processor, optimizer, cfg, state=None) -> str:
    """ckpt-STEP/ (the model, with PEFT's adapter files under LoRA; tokenizer, image processor,
    train_config.json, trainer_state.pt: optimizer, step, RNG) written as ckpt-STEP.tmp/, fsynced and
    renamed, then `latest` pointed at it (also by rename): a run killed at any moment keeps its
    previous checkpoint whole. Older checkpoints are removed. state: (whole weights, the folder of the
    optimizer's shards) when the model's own are shards (FSDP: parallel.sharded_state)."""
    final = os.path.join(run, f"ckpt-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_checkpoint_files(tmp, step, model, tokenizer, processor, optimizer, cfg, state)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk, a quota, a folder gone
        shutil.rmtree(tmp, ignore_errors=True)
        print(file=sys.stderr)  # below the progress bar
        free = shutil.disk_usage(run).free / 2 ** 20
        need = sum(p.numel() * p.element_size() * 3 for p in model.parameters()) / 2 ** 20  # weights, Adam's 2
        fail(f"saving {final} failed ({e}); {free:,.0f} MiB free on the disk of {run}, a checkpoint needs "
             f"about {need:,.0f} MiB; kept {latest_checkpoint(run) or 'no checkpoint'}: free space, then --resume")
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


def write_checkpoint_files(tmp: str, step: int, model, tokenizer, processor, optimizer, cfg, state=None):
    """Everything a checkpoint holds, written into the folder `tmp` and fsynced."""
    os.makedirs(tmp)
    weights, optimizer_state = state or (model.state_dict(), optimizer.state_dict())
    if isinstance(optimizer_state, str):  # FSDP: each process wrote its shard there (torch.distributed.checkpoint)
        os.replace(optimizer_state, os.path.join(tmp, "optimizer"))
        optimizer_state = None
    if any(".lora_" in k for k in weights):  # base weights + PEFT's adapter files
        model.save_pretrained(tmp, state_dict=base_state_dict(weights))
        save_adapter(model, tmp, state=weights)
    else:
        model.save_pretrained(tmp, state_dict=weights)
    tokenizer.save(tmp)
    if processor is not None:
        processor.save(tmp)
    write_json(dataclasses.asdict(cfg), os.path.join(tmp, "train_config.json"))
    torch.save({"step": step, "optimizer": optimizer_state, "rng_torch": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "rng_python": random.getstate()}, os.path.join(tmp, "trainer_state.pt"))
    for name in os.listdir(tmp):  # on disk before the rename: a power cut leaves no empty files behind `latest`
        fsync(os.path.join(tmp, name))
    fsync(tmp)


def load_trainer_state(ckpt: str, optimizer, load_optimizer=None) -> int:
    """The optimizer and RNG states of a checkpoint put back, as save_checkpoint left them (a sharded one's
    optimizer from its shards, by `load_optimizer(folder)`: parallel.sharded_optimizer_loader); its step."""
    try:  # weights_only: a damaged or hostile file is refused, never run; its unpickler
        # may fail on garbage with any error (UnpicklingError, IndexError, UnicodeDecodeError...)
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    except Exception as e:
        fail(f"--resume: {ckpt}/trainer_state.pt is damaged ({type(e).__name__}: {e}); "
             "no whole checkpoint to continue from")
    if not isinstance(state, dict):
        fail(f"--resume: {ckpt}/trainer_state.pt is damaged (holds a {type(state).__name__}, not a trainer state); "
             "no whole checkpoint to continue from")
    try:
        if state["optimizer"] is None and load_optimizer is not None:
            load_optimizer(os.path.join(ckpt, "optimizer"))
        else:
            optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_torch"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        random.setstate(state["rng_python"])
        return int(state["step"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
        fail(f"--resume: {ckpt}/trainer_state.pt is damaged ({type(e).__name__}: {e}); "
             "no whole checkpoint to continue from")


def say_start(cfg, model, samples: int, skipped: int, world: int, device, kept: bool):
    """The run's first line: what trains, on what data, in how many processes and how."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{cfg.phase} ({cfg.preset}): {trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, {samples:,} training samples, {world} process(es) on {device}"
          + (" sharded (FSDP2)" if cfg.fsdp else "")
          + ("; activations recomputed" if cfg.activation_checkpointing else "")
          + (f"; {skipped} unreadable hub sample(s) skipped" if skipped else "")
          + ("; a frozen tower: features kept per image" if kept else ""))


def open_log(run: str, start: int):
    """log.jsonl for appending, without the steps logged after the checkpoint resumed from (all of
    them for a new run) and without a line torn by a crash."""
    path = os.path.join(run, "log.jsonl")
    rows = []
    for line in open(path, errors="replace") if os.path.isfile(path) else ():  # bytes that are not UTF-8: a torn line
        try:
            if json.loads(line)["step"] <= start:
                rows.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    try:
        with open(path + ".tmp", "w") as f:
            f.writelines(rows)
        os.replace(path + ".tmp", path)
        return open(path, "a")
    except OSError as e:  # a full disk: the checkpoint is whole, only the log cannot be written
        fail(f"cannot write {path} ({e}); free space on its disk, then --resume")


def log_step(bar, log, row: dict):
    """A step's row on the progress bar (validation numbers written above it) and in log.jsonl."""
    val = {k: v for k, v in row.items() if k.startswith("val_")}
    if val:
        bar.write(f"step {row['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
    bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "step" and k not in val})
    log.write(json.dumps(row) + "\n")
    log.flush()


STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}  # Ctrl-C; timeout, docker, Slurm


def catch_stop_signals():
    """Ctrl-C or SIGTERM (what `timeout`, `docker stop`, Slurm and Kubernetes send) ends the run after the
    step under way, a checkpoint saved; a second one at once. Returns a function giving the signal
    that came (0: none); the exit status is then 128 + its number, as a shell reports it."""
    came = []

    def handler(signum, frame):
        if came:
            sys.exit(128 + signum)
        came.append(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    return lambda: came[0] if came else 0


def release_stop_signals():
    """The default handlers again: Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def quiet_sigterm():
    """SIGTERM before the first step (while the data or the model loads): nothing to save; one line."""
    def handler(signum, frame):
        print("\nterminated before training started", file=sys.stderr)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


