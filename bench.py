"""Benchmarks against `transformers`, on the same weights, in the same run, printed as ratios.

    python bench.py lm        # LM prefill time and decode tokens/s (SmolLM2-135M-Instruct GGUF)
    python bench.py vision    # vision tower images/s, batch 8 (DINOv2-S from the shared assets)
"""

import argparse
import os
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_lm(args):
    """Prefill: one forward over the prompt (logits of the last token only, as both generate()s do).
    Decode: (N - 1) / (time of N new tokens - time of 1 new token), greedy, no early stop."""
    from transformers import AutoModelForCausalLM

    from generate import default_lm, generate
    from model import LanguageModel
    from processing import Tokenizer, build_prompt

    dtype = getattr(torch, args.dtype)
    path = args.model or default_lm()
    ours = LanguageModel.from_pretrained(path, dtype=dtype, device=args.device)
    tok = Tokenizer.from_pretrained(path)
    if path.endswith(".gguf"):
        theirs = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)
    else:
        theirs = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    theirs = theirs.to(args.device).eval()
    theirs.generation_config.eos_token_id = None  # no early stop: both decode exactly N tokens
    text = "Write a short story about a robot who learns to paint. " * (args.prompt_repeat)
    ids = torch.tensor([build_prompt(tok, [{"role": "user", "content": text}])], device=args.device)
    n = args.new_tokens
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def ours_gen(k):
        out = generate(ours, ids, max_new_tokens=k)
        sync()
        return out

    def theirs_gen(k):
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, do_sample=False,
                              pad_token_id=tok.pad_id)
        sync()
        return out[:, ids.shape[1]:]

    def ours_prefill():
        with torch.inference_mode():
            ours(ids, cache=ours.new_cache(1, ids.shape[1]), last_only=True)
        sync()

    def theirs_prefill():
        with torch.inference_mode():
            theirs(ids, use_cache=True, logits_to_keep=1)
        sync()

    same = torch.equal(ours_gen(n), theirs_gen(n))
    rows = []
    rows.append(("prefill (s)", timed(ours_prefill, args.repeats), timed(theirs_prefill, args.repeats), "lower"))
    decode = []
    for gen in (ours_gen, theirs_gen):
        t1, tn = timed(lambda: gen(1), args.repeats), timed(lambda: gen(n), args.repeats)
        decode.append((n - 1) / (tn - t1))
    rows.append(("decode (tokens/s)", decode[0], decode[1], "higher"))
    print(f"LM: {os.path.basename(path)}  prompt {ids.shape[1]} tokens, {n} new tokens, "
          f"{args.dtype} on {args.device}, {torch.get_num_threads()} threads; same greedy tokens: {same}")
    table(rows)


def bench_vision(args):
    """Images/s of the vision tower on a batch, against the transformers model on the same weights."""
    from transformers import AutoModel

    from siglip import VisionTower

    path = args.model or os.path.join(os.environ.get("GLIMPSE_ASSETS", "../shared/assets"), "dinov2-small")
    dtype = getattr(torch, args.dtype)
    ours = VisionTower.from_pretrained(path, dtype=dtype, device=args.device)
    theirs = AutoModel.from_pretrained(path, dtype=dtype).to(args.device).eval()
    theirs = getattr(theirs, "vision_model", theirs)  # the vision half of a full SigLIP/CLIP checkpoint
    size = args.image_size
    pixels = torch.randn(args.batch, 3, size, size, device=args.device, dtype=dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run(model):
        def step():
            with torch.inference_mode():
                out = model(pixels)
            sync()
            return out
        return step

    with torch.inference_mode():
        same = (ours(pixels) - theirs(pixel_values=pixels).last_hidden_state).abs().max().item()
    rows = [("images/s", args.batch / timed(run(ours), args.repeats),
             args.batch / timed(run(lambda p: theirs(pixel_values=p)), args.repeats), "higher")]
    print(f"vision: {path} ({ours.config.family}), batch {args.batch} at {size}px, {args.dtype} on {args.device}, "
          f"{torch.get_num_threads()} threads; max abs difference {same:.2e}")
    table(rows)


def table(rows):
    print(f"{'metric':<22}{'glimpse':>12}{'transformers':>14}{'ratio':>10}")
    for name, ours, theirs, better in rows:
        ratio = theirs / ours if better == "lower" else ours / theirs  # > 1: glimpse is faster
        print(f"{name:<22}{ours:>12.4g}{theirs:>14.4g}{ratio:>9.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark glimpse against transformers on the same weights.")
    p.add_argument("what", choices=["lm", "vision"], help="which benchmark")
    p.add_argument("--model", default=None, help="checkpoint: hub id, folder or .gguf (default: SmolLM2-135M-Instruct "
                   "GGUF for lm, the shared DINOv2-S for vision)")
    p.add_argument("--batch", type=int, default=8, help="vision: images per batch")
    p.add_argument("--image-size", type=int, default=224, help="vision: pixels per side")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-repeat", type=int, default=4, help="how many times the prompt sentence repeats")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    {"lm": bench_lm, "vision": bench_vision}[args.what](args)


if __name__ == "__main__":
    main()
