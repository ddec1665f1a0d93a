"""Compiled decoding: one decoding step with static shapes, for `torch.compile` (gpt-fast's recipe, in
pure PyTorch; github.com/pytorch-labs/gpt-fast).

Eager decoding attends over the KV cache's filled slots, a length that grows by one every step, and
spends most of a small model's step in Python between kernels. `torch.compile` removes that Python and
fuses the small operations (norms, RoPE, SiLU), but it compiles for fixed shapes: a growing length would
recompile every step. Here a step writes its key and value at a slot given as a tensor (`index_copy_`,
model.Attention) and attends over *every* slot of a cache allocated for a whole number of BUCKET
positions, the slots not yet filled masked out. Every step then has the same shapes, and one graph,
compiled on the first step, serves them all; prompts whose cache rounds up to the same size share it.

The prefill (the prompt, the image) stays eager: it runs once per answer. Whether compiling wins
depends on the machine and the weight format; bench.py decode times decoding with and without it.
"""

import torch

from model import KVCache, LanguageModel

BUCKET = 256  # cache lengths are rounded up to a multiple of this: fewer shapes, fewer compilations


def cache_length(lm: LanguageModel, tokens: int) -> int:
    """The static cache length for `tokens` positions (prompt plus new tokens): rounded up to BUCKET."""
    return min(-(-tokens // BUCKET) * BUCKET, lm.max_seq_len)


def unsupported(lm: LanguageModel) -> str | None:
    """Why `lm` cannot decode compiled (data-dependent expert routing, local attention), or None."""
    cfg = lm.config
    if any(cfg.is_moe(i) for i in range(cfg.n_layers)):
        return "mixture-of-experts layers route tokens by value, which a static graph cannot hold"
    if any(block.chunked for block in lm.layers):
        return "chunked (local) attention masks by position chunk"
    return None


class CompiledDecoder:
    """Calls like the LM in a decoding step, `decoder(token (B, 1), cache=cache)` -> logits (B, 1, V), through
    one compiled graph. The cache must have been made `cache_length` long (generate.prefill does)."""

    def __init__(self, lm: LanguageModel):
        reason = unsupported(lm)
        if reason:
            raise ValueError(f"--compile: {reason}; decode without it")
        self.lm, self.compiled_once = lm, False
        self.step = torch.compile(self._step, fullgraph=True, dynamic=False)

    def __call__(self, input_ids, cache: KVCache):  # input_ids (B, 1)
        cache.slot = torch.tensor([cache.length], device=input_ids.device)  # (1,): where this step writes
        try:
            logits = self.step(input_ids, cache)  # (B, 1, V)
        except Exception as e:  # the compiler failed (no C++ compiler for CPU code, say): one line, not its trace
            if self.compiled_once:
                raise
            said = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise RuntimeError(f"--compile: torch.compile failed ({said[:200]}); decode without --compile") from e
        finally:
            cache.slot = None
        self.compiled_once = True
        cache.length += 1
        return logits

    def _step(self, input_ids, cache: KVCache):  # input_ids (B, 1) -> logits (B, 1, V)
        lm = self.lm
        position_ids = cache.valid.sum(dim=1, keepdim=True)  # (B, 1): the real tokens before this one
        cache.valid.index_fill_(1, cache.slot, True)
        cache.pos.index_copy_(1, cache.slot, position_ids)
        masks = {"full": cache.valid[:, None, None, :]}  # (B, 1, 1, S): the filled slots, this one included
        x = lm.embed(input_ids)  # (B, 1, D)
        cos, sin = lm.rope(position_ids, x.dtype)  # (B, 1, 1, hd) each
        for block in lm.layers:
            x, _ = block(x, cos, sin, masks, cache)  # (B, 1, D)
        return lm.head(lm.norm(x))  # (B, 1, V)
