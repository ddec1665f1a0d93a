"""Weight-only int8 and int4 linear layers for decoding (`--quantize`): gpt-fast's quantize.py on PyTorch's
CPU kernels. Decoding one token reads every weight once, so fewer bytes per weight run it faster;
`bench.py decode` measures by how much, beside transformers.
"""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import LanguageModel

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
    """Swap the LM's linear layers for int8 or int4 ones, in place. int4 runs on CPUs only and needs
    out % 16 == 0 and in % group == 0: the names of layers that keep their float weights come back.
    Rounding llama.cpp's Q4_1 weights (W = d * q + m, min/max per block of 32) again with group 32
    gives back their very grid: the GGUF's own 4-bit weights, repacked. The output head (tied or not)
    becomes int8 with int8, and keeps its float weights with int4: a Q4 file's head is Q8_0, one scale
    per 32 weights, which one scale per row cannot hold; re-rounded, SmolLM2's greedy tokens left
    float32's after 19 of 64, kept they stay all 64 (10% slower; docs/decoding.md)."""
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
    if mode == "int8":
        lm.lm_head = Int8Linear(lm.lm_head.weight if lm.lm_head is not None else lm.embed.weight)  # (V, D)
    return kept
