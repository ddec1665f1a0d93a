"""Kernels chosen by measuring the machine they run on: the float32 matrix-vector product of CPU decoding
(`linear`: F.linear or bmm over blocks of weight rows) and the training dtype of `--dtype auto` on CPU.

Why measure? The fastest kernel depends on the CPU, its threads and the shape, not on the code. On
2 threads of an AMD EPYC (Zen 5), MKL's matrix-vector product reads 16 GB/s of weights and bmm
over row blocks 40-60; on a 2-core Intel Xeon the same bmm is 2-6x *slower* than F.linear
(70-114 GB/s against 18-33). bfloat16 autocast doubles a training step's speed on one CPU and
halves it on another. No rule written from one machine holds on the next, so, like
`torch.backends.cudnn.benchmark`, glimpse times the candidates on the first call and keeps the
faster for the rest of the process.
"""

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Choice:
    name: str  # the chosen candidate: the faster (faster_dtype: bfloat16 only by a margin)
    times: dict[str, float]  # each candidate's best time, seconds
    cost: float  # seconds spent measuring them, warm-up included


# (weight shape, rows, device, threads) -> the kernel `linear` runs for it, measured in this process
CHOSEN: dict[tuple, Choice] = {}


def fastest(candidates: dict, repeats: int = 5) -> Choice:
    """The fastest of `candidates` ({name: fn()}) by its best time over `repeats` calls, taken in
    turn so that a slow moment of the machine hits them all alike."""
    start, best = time.perf_counter(), {}
    for fn in candidates.values():
        fn()  # warm-up: first-call allocations and caches
    for _ in range(repeats):
        for name, fn in candidates.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    return Choice(min(best, key=best.get), best, time.perf_counter() - start)


def row_blocks_linear(x, weight):  # x (..., in), weight (out, in) -> (..., out)
    """x @ weight.T as torch.bmm over one block of weight rows per thread (at least two): bmm runs its
    batch in parallel, where some BLAS libraries run a matrix-vector product on one thread, slowly."""
    rows, blocks = x.numel() // x.shape[-1], max(2, torch.get_num_threads())
    row_blocks = weight.view(blocks, -1, weight.shape[1])  # (P, out/P, in)
    columns = x.reshape(rows, -1).T.expand(blocks, -1, -1)  # (P, in, rows), one copy shared
    y = torch.bmm(row_blocks, columns)  # (P, out/P, rows)
    return y.permute(2, 0, 1).reshape(*x.shape[:-1], -1)  # (..., out)


def linear(x, weight, bias=None):  # x (..., in), weight (out, in) -> (..., out)
    """F.linear, except for the few float32 rows of CPU decoding (1-4 tokens), where the first call of
    each weight shape times F.linear against `row_blocks_linear` and the faster serves from then on
    (`CHOSEN`). Anything else, bfloat16 and autocast included, is F.linear (oneDNN already uses every thread)."""
    if torch.compiler.is_compiling():  # a compiled graph (compiled.py): the compiler picks its own kernel
        return F.linear(x, weight, bias)
    rows, blocks = x.numel() // x.shape[-1], max(2, torch.get_num_threads())
    if x.device.type != "cpu" or x.dtype != torch.float32 or not 0 < rows <= 4 or weight.shape[0] % blocks or \
            not weight.is_contiguous() or torch.is_autocast_enabled("cpu"):
        return F.linear(x, weight, bias)
    key = (tuple(weight.shape), rows, str(x.device), torch.get_num_threads())
    if key not in CHOSEN:
        with torch.no_grad():
            CHOSEN[key] = fastest({"F.linear": lambda: F.linear(x, weight),
                                   "bmm row blocks": lambda: row_blocks_linear(x, weight)})
    y = row_blocks_linear(x, weight) if CHOSEN[key].name == "bmm row blocks" else F.linear(x, weight)
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear through `linear` above: the LM's projections."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


BF16_MARGIN = 0.95  # bfloat16 rounds: it must take under 95% of float32's time, more than timing noise


def faster_dtype(model: nn.Module, loss, repeats: int = 3, say: bool = False) -> Choice:
    """"bfloat16" if a training step on CPU, loss() (a small batch's) and its backward, measures faster
    under bfloat16 autocast than in float32 by more than noise (BF16_MARGIN), else "float32": where the
    two tie, a coin flip of the clock would pick the run's numerics. Under torch.distributed, rank 0's
    answer for every process; said in one line if `say`. The gradients are dropped and the RNG put back:
    the run goes on as if nothing was timed."""
    def step(bf16: bool):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            value = loss()  # ()
        if value.requires_grad:
            value.backward()
        model.zero_grad(set_to_none=True)

    rng = torch.get_rng_state()
    choice = fastest({"float32": lambda: step(False), "bfloat16": lambda: step(True)}, repeats)
    torch.set_rng_state(rng)
    choice.name = "bfloat16" if choice.times["bfloat16"] < BF16_MARGIN * choice.times["float32"] else "float32"
    if dist.is_initialized():  # one dtype for every process: rank 0's
        flag = torch.tensor([float(choice.name == "bfloat16")], device=next(model.parameters()).device)  # (1,)
        dist.broadcast(flag, src=0)
        choice.name = "bfloat16" if flag.item() else "float32"
    if say:
        print(f"--dtype auto: a training step took {choice.times['float32']:.3g} s in float32, "
              f"{choice.times['bfloat16']:.3g} s in bfloat16 (taken if under {BF16_MARGIN:.0%}): {choice.name}")
    return choice
