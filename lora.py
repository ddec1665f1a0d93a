"""LoRA: low-rank adapters on the LM's linear layers, read top to bottom.

    Linear_LORA -> apply_lora -> disable_adapters, merge_lora -> save_adapter, load_adapter

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": a frozen linear y = W x gets a
trainable low-rank update, y = W x + (alpha / r) * B A x, with A (r x in) random and B (out x r) zero,
so training starts exactly from the base model and only r * (in + out) numbers per layer learn.

Mirrors `peft/tuners/lora/layer.py` (class `Linear`), and adapters are saved in PEFT's file format
(adapter_config.json + adapter_model.safetensors under transformers' parameter names), so an adapter
trained here loads in `peft.PeftModel.from_pretrained` and one trained with PEFT loads here. For a VLM
the adapters go into the LM (`model.lm`) only; the vision tower and the connector are not adapted.
"""

import math
import re
from contextlib import contextmanager

import torch
import torch.nn as nn

from checkpoints import PEFT_PREFIX, read_adapter, write_adapter


class Linear_LORA(nn.Module):
    """base(x) + B(A(dropout(x))) * alpha / r around a frozen nn.Linear (PEFT `lora.Linear`)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"the LoRA rank r must be positive, got {r}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        w = base.weight  # (out, in)
        # A half-precision base gets float32 adapters, as PEFT's autocast_adapter_dtype does.
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=w.device, dtype=dtype)  # weight (r, in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=w.device, dtype=dtype)  # weight (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)  # B A = 0: a fresh adapter changes nothing
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True while B A * scale is folded into base.weight
        self.enabled = True  # False: the layer is its base layer (DPO's reference model)
        self.train(base.training)  # an adapter put into an eval-mode model starts in eval mode (no dropout)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}, enabled={self.enabled}"

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale

    def forward(self, x):  # (..., in) -> (..., out)
        if not self.enabled and self.merged:
            raise RuntimeError("a LoRA layer switched off while merged; unmerge() first (disable_adapters does)")
        y = self.base(x)  # (..., out)
        if not self.enabled or self.merged:
            return y
        a = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return (y + self.lora_B(a) * self.scale).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        """W <- W + B A * scale, written into the existing weight tensor, so its layout and any views of
        it stay as they were."""
        if not self.merged:
            self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W <- W - B A * scale: the base weight again, up to rounding."""
        if self.merged:
            self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = False


# ---------------------------------------------------------------------------------------------
# Putting adapters in, switching them off, folding them away
# ---------------------------------------------------------------------------------------------


def _lm(model) -> nn.Module:
    return getattr(model, "lm", model)  # a VLM's LM, or the LM itself


def lora_layers(model) -> dict[str, Linear_LORA]:
    """Every LoRA layer of the LM, by its module name in the LM (layers.0.attn.q_proj, ...)."""
    return {name: m for name, m in _lm(model).named_modules() if isinstance(m, Linear_LORA)}


def _linears(lm) -> list[str]:
    """Names of the LM's linear layers; a LoRA-wrapped one counts once, under its own name."""
    wrapped = lora_layers(lm)
    return [name for name, m in lm.named_modules()
            if isinstance(m, (nn.Linear, Linear_LORA)) and name.rpartition(".")[0] not in wrapped]


def _matches(name: str, targets) -> bool:
    """PEFT's rule for `target_modules` (peft/tuners/tuners_utils.py, check_target_module_exists):
    "all-linear" is every linear but the output head, another string is a regex the whole name must
    match, a list names modules by suffix ("q_proj" matches layers.3.attn.q_proj) or in full."""
    if targets == "all-linear":
        return name != "lm_head"
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_module(root: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def apply_lora(model, targets=("q_proj", "v_proj"), r: int = 8, alpha: float = 16, dropout: float = 0.1,
               trainable=(), layers=None):
    """Wrap the LM's linears that `targets` names (see _matches: suffixes, "all-linear" or a regex) in
    Linear_LORA, in the blocks whose index is in `layers` (PEFT's layers_to_transform; None: all),
    freeze every other parameter of `model` except those whose names start with one of the `trainable`
    prefixes (e.g. ("connector.",)). Returns the model, changed in place."""
    lm = _lm(model)
    if lora_layers(lm):
        raise ValueError("the model already has LoRA layers (merge_lora it, or load_adapter into it)")
    if layers is not None and not set(layers) <= set(range(len(lm.layers))):
        raise ValueError(f"LoRA layers {min(layers)}..{max(layers)}: the LM's are 0..{len(lm.layers) - 1}")
    names = [name for name in _linears(lm) if _matches(name, targets) and (
        layers is None or name.startswith("layers.") and int(name.split(".")[1]) in layers)]  # layers.3.attn.q_proj
    if not names:
        raise ValueError(f"no linear layer of the LM matches the LoRA targets {targets!r}")
    for name in names:
        _set_module(lm, name, Linear_LORA(lm.get_submodule(name), r, alpha, dropout))

    trainable = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    params = dict(model.named_parameters())
    unknown = [t for t in trainable if not any(name.startswith(t) for name in params)]
    if unknown:
        raise ValueError(f"no parameter name starts with {unknown} (trainable prefixes)")
    for name, p in params.items():
        p.requires_grad_(name.startswith(trainable))
    for layer in lora_layers(lm).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    return model


def print_trainable_parameters(model):
    """The trainable share of `model`'s parameters, in the line PEFT's print_trainable_parameters prints."""
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"trainable params: {n_train:,d} || all params: {n_all:,d} || trainable%: {100 * n_train / n_all:.4f}")


@contextmanager
def disable_adapters(model):
    """Inside the block the LM is its base model, as in PEFT's `disable_adapter()`: DPO's reference
    pass runs here. A merged layer is unmerged first, as PEFT does (and stays unmerged)."""
    layers = list(lora_layers(model).values())
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, before):
            layer.enabled = enabled


def merge_lora(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back in its place: no LoRA
    code is left (fast inference, save_pretrained). Returns the model, changed in place; the base
    weights keep the requires_grad that apply_lora gave them (False)."""
    lm = _lm(model)
    for name, layer in lora_layers(lm).items():
        layer.merge()
        _set_module(lm, name, layer.base)
    return model


# ---------------------------------------------------------------------------------------------
# PEFT's file format (adapter_config.json + adapter_model.safetensors: checkpoints.read_adapter)
# ---------------------------------------------------------------------------------------------


def _hf_module_names(lm) -> dict[str, str]:
    """Our linear's name -> its name in the transformers model (layers.0.attn.q_proj ->
    model.layers.0.self_attn.q_proj), through the LM's `hf_names()`; a layer transformers has no
    name for (or an LM without hf_names) keeps ours."""
    hf_names = getattr(lm, "hf_names", None)
    weights = hf_names() if hf_names is not None else {}
    return {name: weights.get(f"{name}.weight", f"{name}.weight").removesuffix(".weight") for name in _linears(lm)}


def save_adapter(model, folder: str, base_model_name_or_path: str | None = None, state: dict | None = None):
    """Write the LM's adapters as PEFT's `save_pretrained` does: keys
    base_model.model.<transformers module>.lora_A.weight (r, in) and .lora_B.weight (out, r), and a
    LoraConfig listing the adapted modules by full name. Each file is written to a temporary name and
    then renamed into place (checkpoints.write_adapter). state: the model's whole state dict, when its
    own tensors are shards (FSDP: parallel.sharded_state)."""
    lm = _lm(model)
    layers = lora_layers(lm)
    if not layers:
        raise ValueError("the model has no LoRA layers to save (apply_lora first)")
    hf = _hf_module_names(lm)
    adapter, prefix = {}, "lm." if lm is not model else ""
    for name, layer in layers.items():
        for ab in ("lora_A", "lora_B"):  # weights (r, in), (out, r)
            adapter[f"{PEFT_PREFIX}{hf[name]}.{ab}.weight"] = \
                state[f"{prefix}{name}.{ab}.weight"] if state else getattr(layer, ab).weight
    first = next(iter(layers.values()))
    write_adapter(folder, adapter, r=first.r, alpha=first.alpha, dropout=getattr(first.dropout, "p", 0.0),
                  targets=sorted(hf[name] for name in layers), base=base_model_name_or_path)


def load_adapter(model, folder: str):
    """Load a PEFT LoRA adapter folder into the model's LM. Without LoRA yet, apply_lora runs with the
    file's rank, alpha, dropout and targets; with LoRA, its layers must be the adapter's (same modules,
    rank and alpha). Everything is checked before the model changes: a rank, target or base-shape
    mismatch is a ValueError naming the module. Returns the model."""
    cfg, weights = read_adapter(folder)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    lm = _lm(model)
    hf = _hf_module_names(lm)
    wanted = [name for name in hf if _matches(hf[name], cfg["target_modules"])]
    if not wanted:
        raise ValueError(f"{folder}: target_modules {cfg['target_modules']!r} match no linear layer of the LM")
    layers = lora_layers(lm)
    if layers:
        check_same_lora(layers, wanted, r, alpha, folder)
    loaded = {}  # our module name -> (A (r, in), B (out, r))
    for name in wanted:
        key = PEFT_PREFIX + hf[name]
        a, b = weights.pop(f"{key}.lora_A.weight", None), weights.pop(f"{key}.lora_B.weight", None)
        if a is None or b is None:
            raise ValueError(f"{name}: the adapter in {folder} has no {key}.lora_A/lora_B weights for it")
        if a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"{name}: the adapter's lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                             f"are not rank {r}")
        base = lm.get_submodule(name)
        base = base.base if isinstance(base, Linear_LORA) else base
        if (a.shape[1], b.shape[0]) != (base.in_features, base.out_features):
            raise ValueError(f"{name}: the adapter was trained on a {a.shape[1]} -> {b.shape[0]} linear, "
                             f"this model's is {base.in_features} -> {base.out_features}")
        loaded[name] = a, b
    if weights:  # keys left over: layers the file has weights for but its targets do not select
        key = min(weights)
        module = key.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0]  # drop .lora_A.weight
        name = {theirs: ours for ours, theirs in hf.items()}.get(module, module)
        raise ValueError(f"{name}: the adapter in {folder} has weights for it ({key}) but target_modules "
                         "does not select it")

    if not layers:
        apply_lora(model, targets=wanted, r=r, alpha=alpha, dropout=cfg.get("lora_dropout", 0.0))
        layers = lora_layers(lm)
    with torch.no_grad():
        for name, (a, b) in loaded.items():
            layers[name].lora_A.weight.copy_(a)  # (r, in)
            layers[name].lora_B.weight.copy_(b)  # (out, r)
    return model


def check_same_lora(layers: dict, wanted: list, r: int, alpha: float, folder: str):
    """LoRA is on already: it must be the adapter's, on the same modules, unmerged, same rank and alpha."""
    differ = sorted(set(wanted) ^ set(layers))
    if differ:
        name = differ[0]
        where = "the adapter targets it but the model has no LoRA there" if name in wanted else \
            "the model has LoRA there but the adapter does not target it"
        raise ValueError(f"{name}: {where} ({folder})")
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"{name}: its adapter is merged into the weight; unmerge() before loading")
        if (layer.r, layer.alpha) != (r, alpha):
            raise ValueError(f"{name}: the model's LoRA has rank {layer.r} and alpha {layer.alpha}, "
                             f"the adapter in {folder} rank {r} and alpha {alpha}")
