"""The language model of glimpse: a LLaMA-style decoder, read top to bottom.

    LMConfig -> RMSNorm, RoPE, KVCache, Attention (GQA, chunked/NoPE), MLP (SwiGLU), MoE -> Block
    -> LanguageModel -> loading (HF Llama/Qwen2 safetensors, GGUF) and saving, its key map

Mirrors `transformers/models/llama/modeling_llama.py` (Touvron et al. 2023, "LLaMA"), with the
options of Qwen2 (q/k/v bias), Mixtral (mixture of experts, Jiang et al. 2024) and LLaMA-4
(interleaved NoPE layers with chunked local attention in the RoPE layers). The VLM around it
(vision tower, connector, image embeddings at the `<image>` placeholders) is in vlm.py. The projections
are autotune.Linear: nn.Linear whose decoding product is picked by timing it on this machine.
"""

import math
import os
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoints import (WEIGHT_FILES, CheckpointError, checkpoint_folder, load_state, read_gguf, read_json,
                         read_safetensors, write_checkpoint)
from configs import build_config, check_memory, hf_lm_config, lm_settings
from autotune import Linear, linear


@dataclass
class LMConfig:
    """The LM's shape and options. The defaults are SmolLM2-135M's (HuggingFaceTB/SmolLM2-135M config.json)."""
    vocab_size: int = 49152
    dim: int = 576  # hidden size
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3  # < n_heads: grouped-query attention
    head_dim: int = 0  # 0: dim // n_heads
    hidden_dim: int = 1536  # SwiGLU inner size
    norm_eps: float = 1e-5
    max_seq_len: int = 8192
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    o_bias: bool = False  # Llama's attention_bias=True puts one on o_proj too
    # Mixture of experts (Mixtral / LLaMA-4): 0 experts means a dense SwiGLU MLP everywhere.
    n_experts: int = 0
    top_k: int = 2
    shared_expert: bool = True
    moe_every: int = 1  # layers i with (i + 1) % moe_every == 0 are MoE layers
    # LLaMA-4's interleaved attention: every nope_every-th layer has no RoPE and full causal
    # attention; the others use RoPE and, if attention_chunk > 0, attend only inside their chunk.
    nope_every: int = 0
    attention_chunk: int = 0

    def __post_init__(self):
        if min(self.n_heads, self.n_kv_heads) < 1:
            raise ValueError(f"n_heads ({self.n_heads}) and n_kv_heads ({self.n_kv_heads}) must be at least 1")
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        for name in ("rope_theta", "norm_eps"):
            if not 0 < getattr(self, name) < math.inf:  # NaN fails too
                raise ValueError(f"{name} must be a positive number, not {getattr(self, name)}")
        per_layer = 2 * self.dim * self.head_dim * (self.n_heads + self.n_kv_heads) + \
            3 * self.dim * self.hidden_dim * max(1, self.n_experts + self.shared_expert)
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        check_memory("this LM config", embeddings + self.n_layers * per_layer)
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        needs = {"default": (), "linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
        if kind not in needs or any(not 0 < scaling.get(k, 0) < math.inf for k in needs.get(kind, ())):
            raise ValueError(f"rope_scaling {scaling} needs rope_type default, linear (factor) or llama3 (factor, "
                             "low_freq_factor, high_freq_factor), each factor a positive number")

    def is_moe(self, layer: int) -> bool:
        return self.n_experts > 0 and (layer + 1) % self.moe_every == 0

    def uses_rope(self, layer: int) -> bool:
        return not (self.nope_every > 0 and (layer + 1) % self.nope_every == 0)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (HF `LlamaRMSNorm`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # (D,)

    def forward(self, x):  # (..., D)
        x32 = x.float()  # (..., D)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., D)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: LMConfig) -> torch.Tensor:  # (hd/2,)
    """Inverse frequencies theta^(-2i/d), rescaled as `rope_scaling` asks
    (HF `modeling_rope_utils._compute_llama3_parameters` for "llama3")."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling.get("original_max_position_embeddings", cfg.max_seq_len)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # long waves: slow down
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)  # in between: blend
        return torch.where(medium, smoothed, scaled)  # (hd/2,)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3 are)")


def rotate_half(x):  # (..., hd) -> (..., hd): [x1, x2] -> [-x2, x1], HF's layout
    x1, x2 = x.chunk(2, dim=-1)  # (..., hd/2) each
    return torch.cat((-x2, x1), dim=-1)  # (..., hd)


def apply_rope(x, cos, sin):  # x (B, H, T, hd), cos/sin (B, 1, T, hd)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    Slot s of row b holds the token fed at step s; `valid[b, s]` says whether it is a real token
    (False for left padding) and `pos[b, s]` its position id. Prefill writes many slots at once,
    decoding writes one per step."""

    def __init__(self, cfg: LMConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"a cache of {max_len} positions exceeds the context of {cfg.max_seq_len}")
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]  # L x (B, Hkv, S, hd)
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]  # L x (B, Hkv, S, hd)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.pos = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)  # (B, S)
        self.max_len = max_len
        self.length = 0  # slots filled so far
        self.slot = None  # a compiled step's slot, a (1,) tensor (compiled.py); None: write at `length`

    def reorder(self, index):  # index (B',): row b' of the new cache is row index[b'] of this one
        """Keep, repeat or permute rows, as beam search does when beams fork or die."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        self.valid, self.pos = self.valid.index_select(0, index), self.pos.index_select(0, index)


class Attention(nn.Module):
    """Grouped-query self-attention through `F.scaled_dot_product_attention` (HF `LlamaAttention`).
    With `return_weights` set, it computes softmax(q k^T / sqrt(hd) + mask) itself and keeps the
    probabilities in `weights` (B, H, T, S), as HF's eager attention does with output_attentions."""

    def __init__(self, cfg: LMConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.use_rope = cfg.uses_rope(layer)
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        self.return_weights, self.weights = False, None  # set by the caller (generate.attention_maps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        # x (B, T, D); cos/sin (B, 1, T, hd); mask None (causal) or bool (B, 1, T, S)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and cache.slot is not None:  # compiled: write at the slot, attend all (masked)
            cache.k[self.layer].index_copy_(2, cache.slot, k)
            cache.v[self.layer].index_copy_(2, cache.slot, v)
            k, v = cache.k[self.layer], cache.v[self.layer]  # (B, Hkv, S, hd)
        elif cache is not None:  # write this step's keys/values, then attend over every filled slot
            start, end = cache.length, cache.length + T
            cache.k[self.layer][:, :, start:end] = k
            cache.v[self.layer][:, :, start:end] = v
            k, v = cache.k[self.layer][:, :, :end], cache.v[self.layer][:, :, :end]  # (B, Hkv, S, hd)
        if self.return_weights:
            y = self.explicit(q, k, v, mask)  # (B, H, T, hd)
        else:
            causal = mask is None and T > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=True)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)

    def explicit(self, q, k, v, mask):  # q (B, H, T, hd), k/v (B, Hkv, S, hd), mask None or (B, 1, T, S)
        """What SDPA computes, written out, keeping the probabilities (float32) in self.weights."""
        T, S = q.shape[2], k.shape[2]
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, S, hd)
        v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, S, hd)
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_dim)  # (B, H, T, S)
        if mask is None:  # causal: query t sees the keys up to its own slot, S - T + t
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S)
        self.weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # (B, H, T, S)
        return self.weights.to(v.dtype) @ v  # (B, H, T, hd)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer 2020; HF `LlamaMLP`)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden_dim, bias=False)
        self.up_proj = Linear(dim, hidden_dim, bias=False)
        self.down_proj = Linear(hidden_dim, dim, bias=False)

    def forward(self, x):  # (N, D) or (B, T, D)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (N, D) or (B, T, D)


class MoE(nn.Module):
    """Sparse mixture of SwiGLU experts, with LLaMA-4's shared expert (shared_expert: one more SwiGLU
    that every token goes through; Mixtral has none).

    A linear router scores every expert, each token goes to its `top_k` best (weights renormalised
    to sum to 1, as Mixtral does), and only the experts that some token chose are run. Returns the
    output and the load-balancing loss of Switch Transformers (Fedus et al. 2021) in Mixtral's
    top-k form: n_experts * sum_e f_e * P_e, where f_e is the share of tokens sent to expert e
    (summing to top_k) and P_e the mean router probability of e. A uniform router gives top_k.
    The statistics count every position, padding included, and are averaged over the MoE layers
    (Mixtral pools the layers and can mask padding; for unpadded batches the two agree per layer)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.dim, cfg.hidden_dim) for _ in range(cfg.n_experts))
        self.shared_expert = MLP(cfg.dim, cfg.hidden_dim) if cfg.shared_expert else None

    def forward(self, x):  # x (B, T, D) -> (B, T, D), aux loss ()
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # (N, D)
        probs = self.router(x).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)  # (N, D)
        for e in chosen.unique().tolist():  # only the experts chosen run
            token, slot = (chosen == e).nonzero(as_tuple=True)  # (n_e,), (n_e,)
            out.index_add_(0, token, self.experts[e](x[token]) * weights[token, slot, None])
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)  # (N, D)
        share = F.one_hot(chosen, len(self.experts)).sum(dim=1).float().mean(dim=0)  # (E,) f_e
        aux = len(self.experts) * (share * probs.mean(dim=0)).sum()
        return out.view(B, T, D), aux  # (B, T, D), ()


class Block(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x)) (HF `LlamaDecoderLayer`)."""

    def __init__(self, cfg: LMConfig, layer: int):
        super().__init__()
        self.chunked = cfg.uses_rope(layer) and cfg.attention_chunk > 0
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.moe = cfg.is_moe(layer)
        self.mlp = MoE(cfg) if self.moe else MLP(cfg.dim, cfg.hidden_dim)

    def forward(self, x, cos, sin, masks, cache):  # x (B, T, D), masks: {"full": ..., "chunked": ...}
        x = x + self.attn(self.attn_norm(x), cos, sin, masks["chunked" if self.chunked else "full"], cache)  # (B, T, D)
        if self.moe:
            h, aux = self.mlp(self.mlp_norm(x))  # (B, T, D), ()
            return x + h, aux
        return x + self.mlp(self.mlp_norm(x)), None  # (B, T, D)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class LanguageModel(nn.Module):
    """Token embeddings -> n_layers Blocks -> RMSNorm -> logits (HF `LlamaForCausalLM`)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # (hd/2,)
        self.checkpointing = False  # True: in training, blocks recompute their activations in the backward
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        """Normal(0, 0.02) for linears and embeddings, zero biases (HF's `initializer_range`)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        w = self.embed.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len, w.device, w.dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                inputs_embeds=None, last_only: bool = False, return_aux: bool = False, logits_at=None):
        """input_ids (B, T) or inputs_embeds (B, T, D) -> logits (B, T, V), or (B, 1, V) if last_only, or
        (n, V) at the n True positions of logits_at (B, T) (training: where the loss looks; the LM head of
        a 49k vocabulary costs a fifth of SmolLM2's forward pass at every position).

        attention_mask (B, T): 1 for real tokens, 0 for (left) padding, for the tokens given now;
        a cache remembers the earlier ones. Position ids default to the count of real tokens before
        each one, so left-padded rows get the positions they would have alone. With return_aux the
        mean MoE load-balancing loss over the MoE layers comes back too: (logits, aux)."""
        if inputs_embeds is None:
            if input_ids.dim() != 2 or input_ids.shape[1] == 0:
                raise ValueError(f"input_ids must be (batch, tokens) with tokens > 0, got {tuple(input_ids.shape)}")
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)]
            if bad.numel():
                raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got {int(bad[0])}")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must be (B, T) = {(B, T)} for the tokens given now (the cache "
                             f"remembers earlier ones), got {tuple(attention_mask.shape)}")
        if cache is not None and cache.valid.shape[0] != B:
            raise ValueError(f"the cache was made for batch size {cache.valid.shape[0]}, got {B}")
        start = cache.length if cache is not None else 0
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if start + T > limit:
            raise ValueError(f"{start + T} tokens do not fit the context of {limit} tokens")
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=x.device)  # (B, T)
        attention_mask = attention_mask.bool()  # (B, T)
        if position_ids is None:
            seen = cache.valid[:, :start].sum(dim=1, keepdim=True) if cache is not None else 0  # (B, 1)
            position_ids = (seen + attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)

        masks = self._masks(attention_mask, position_ids, cache)
        if cache is not None:
            cache.valid[:, start:start + T] = attention_mask
            cache.pos[:, start:start + T] = position_ids
        cos, sin = self.rope(position_ids, x.dtype)  # (B, 1, T, hd) each

        aux = []
        for block in self.layers:  # checkpointing: keep only each block's input, run it again in the backward
            run = partial(checkpoint, block, use_reentrant=False) if self.checkpointing and self.training else block
            x, layer_aux = run(x, cos, sin, masks, cache)  # (B, T, D)
            if layer_aux is not None:
                aux.append(layer_aux)
        if cache is not None:
            cache.length = start + T
        if last_only:
            x = x[:, -1:]  # (B, 1, D)
        if logits_at is not None:
            x = x[logits_at]  # (n, D)
        logits = self.head(self.norm(x))  # (B, T, V), (B, 1, V) or (n, V)
        if return_aux:
            return logits, (torch.stack(aux).mean() if aux else x.new_zeros(()))
        return logits

    def rope(self, position_ids, dtype):  # (B, T) -> cos, sin (B, 1, T, hd) each
        freqs = position_ids[:, None, :, None].float() * self.inv_freq  # (B, 1, T, hd/2)
        freqs = torch.cat((freqs, freqs), dim=-1)  # (B, 1, T, hd)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def head(self, x):  # (..., D) -> logits (..., V), through the embedding when the head is tied
        return self.lm_head(x) if self.lm_head is not None else linear(x, self.embed.weight)

    def _masks(self, attention_mask, position_ids, cache):
        """Boolean (B, 1, T, S) masks, True where a query may attend a key; None means plain causal.

        "full": causal over the real tokens. "chunked": also only keys whose position lies in the
        query's chunk of `attention_chunk` positions (LLaMA-4's local attention)."""
        T = attention_mask.shape[1]
        start = cache.length if cache is not None else 0
        chunk = self.config.attention_chunk
        has_chunks = chunk > 0 and any(b.chunked for b in self.layers)
        if not has_chunks and (start == 0 or T == 1) and bool(attention_mask.all()) and \
                (cache is None or bool(cache.valid[:, :start].all())):
            return {"full": None, "chunked": None}  # causal and nothing to hide: the fast path
        key_valid, key_pos = attention_mask, position_ids  # (B, S), S = start + T
        if cache is not None:
            key_valid = torch.cat((cache.valid[:, :start], attention_mask), dim=1)  # (B, S)
            key_pos = torch.cat((cache.pos[:, :start], position_ids), dim=1)  # (B, S)
        S = start + T
        q_slot = torch.arange(start, S, device=attention_mask.device)[:, None]  # (T, 1)
        k_slot = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
        full = (k_slot <= q_slot) & key_valid[:, None, :]  # (B, T, S)
        full = full | (k_slot == q_slot)  # a padding query sees itself, so no row is empty (no NaN)
        masks = {"full": full[:, None], "chunked": full[:, None]}
        if has_chunks:
            same_chunk = (key_pos[:, None, :] // chunk) == (position_ids[:, :, None] // chunk)  # (B, T, S)
            masks["chunked"] = (full & same_chunk | (k_slot == q_slot))[:, None]
        return masks

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype=torch.float32, device="cpu") -> "LanguageModel":
        """A Llama/Qwen2 checkpoint (hub id or folder with config.json + safetensors, single or
        sharded), a folder this class saved, or a llama.cpp `.gguf` file (read as the transformers
        checkpoint it was converted from)."""
        if str(name_or_path).endswith(".gguf"):
            where = name_or_path
            hf, state = read_gguf(where)
            cfg, key_map = lm_config_from_hf(hf)
        else:
            where = checkpoint_folder(name_or_path, WEIGHT_FILES)
            cfg, key_map = lm_config_from_hf(read_json(os.path.join(where, "config.json")))
            state = read_safetensors(where)
        model = load_state(cls, cfg, state, key_map, dtype, device, where, ignore=tied_copy(cfg))
        return finish_loading(model, device)

    def hf_names(self) -> dict[str, str]:
        """Our parameter names -> the names in a transformers Llama/Qwen2 model (lora.py writes
        PEFT adapters with them)."""
        return {ours: theirs for theirs, ours in lm_key_map(self.config).items()}

    def save_pretrained(self, folder: str, state_dict: dict | None = None):
        """Write config.json + model.safetensors (the model's weights, or `state_dict`). A config that Llama
        or Qwen2 can express is written in their HF layout (configs.hf_lm_config; loads in
        `transformers.AutoModelForCausalLM`); MoE or NoPE models with our own names, `model_type: glimpse_lm`."""
        hf = hf_lm_config(asdict(self.config))
        state = self.state_dict() if state_dict is None else state_dict
        if hf["model_type"] != "glimpse_lm":
            names = self.hf_names()
            state = {names[k]: v for k, v in state.items()}
        write_checkpoint(folder, hf, state)


# ---------------------------------------------------------------------------------------------
# Loading and saving: what a checkpoint leaves to do, the config, the key map
# ---------------------------------------------------------------------------------------------


def finish_loading(lm: LanguageModel, device) -> LanguageModel:
    """What checkpoints.load_state leaves to do: the RoPE frequencies, a buffer in no checkpoint."""
    lm.inv_freq = rope_inv_freq(lm.config).to(device)  # (hd/2,)
    return lm


def tied_copy(cfg: LMConfig) -> tuple[str, ...]:
    """A checkpoint with tied embeddings may still store its output head: not read (load_state's ignore)."""
    return ("lm_head.weight",) if cfg.tie_embeddings else ()


def lm_key_map(cfg: LMConfig) -> dict[str, str]:
    """HF Llama/Qwen2 tensor names -> ours, for every tensor the model has."""
    m = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        m[hf + "input_layernorm.weight"] = ours + "attn_norm.weight"
        m[hf + "post_attention_layernorm.weight"] = ours + "mlp_norm.weight"
        for p in "qkvo":
            m[hf + f"self_attn.{p}_proj.weight"] = ours + f"attn.{p}_proj.weight"
            if (cfg.qkv_bias and p != "o") or (cfg.o_bias and p == "o"):
                m[hf + f"self_attn.{p}_proj.bias"] = ours + f"attn.{p}_proj.bias"
        for p in ("gate", "up", "down"):
            m[hf + f"mlp.{p}_proj.weight"] = ours + f"mlp.{p}_proj.weight"
    return m


def lm_config_from_hf(hf: dict) -> tuple[LMConfig, dict | None]:
    """Our config from a Llama/Qwen2 config.json (its fields read by configs.lm_settings) or one
    our save_pretrained wrote, and the key map to use (None: the names are already ours)."""
    if hf.get("model_type") == "glimpse_lm":
        return build_config(LMConfig, hf), None
    cfg = build_config(LMConfig, lm_settings(hf))
    try:
        rope_inv_freq(cfg)  # an unsupported rope_type fails here, before any weight is read
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return cfg, lm_key_map(cfg)
