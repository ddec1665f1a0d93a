"""Compiled decoding (compiled.py) on a tiny random LM: every step's logits against eager decoding, with
left padding and across two prompts of different lengths (one graph), beam search through it, the
refusals, and generate.py --compile from the command line."""

import os
import subprocess
import sys

import pytest
import torch

from compiled import BUCKET, CompiledDecoder, cache_length
from generate import generate, prefill
from model import LanguageModel, LMConfig
from test_generate import tiny_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@torch.inference_mode()
def test_compiled_steps_give_eager_logits_and_tokens():
    lm = tiny_lm(vocab=48)
    lm.config.max_seq_len = 512
    compiled = CompiledDecoder(lm)
    for T, padding in ((9, 3), (14, 0)):  # two prompt lengths, one static cache size: one graph
        ids = torch.randint(0, 48, (2, T), generator=torch.Generator().manual_seed(T))
        mask = torch.ones_like(ids)
        mask[1, :padding] = 0
        eager, _ = prefill(lm, ids, mask, 12, {})
        static, logits = prefill(lm, ids, mask, 12, {}, static=True)
        assert static.max_len == cache_length(lm, T + 12) == BUCKET
        token = logits.argmax(-1)  # (B, 1)
        for _ in range(12):
            want, got = lm(token, cache=eager), compiled(token, cache=static)  # (B, 1, V)
            assert (got - want).abs().max() <= 1e-4
            token = want.argmax(-1)
        assert static.length == eager.length == T + 12
        assert torch.equal(generate(lm, ids, 12, attention_mask=mask, compiled=compiled),
                           generate(lm, ids, 12, attention_mask=mask))
    beams = dict(attention_mask=mask, num_beams=3, eos_ids=[5])
    assert torch.equal(generate(lm, ids, 8, compiled=compiled, **beams), generate(lm, ids, 8, **beams))


def test_what_cannot_compile_is_refused_by_name():
    moe = LanguageModel(LMConfig(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                 max_seq_len=64, n_experts=2, top_k=1))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        CompiledDecoder(moe)
    chunked = LanguageModel(LMConfig(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                     max_seq_len=64, attention_chunk=8))
    with pytest.raises(ValueError, match="chunked"):
        CompiledDecoder(chunked)


def test_a_failing_compiler_is_one_line():
    lm = tiny_lm()
    compiled = CompiledDecoder(lm)

    def no_compiler(*_):
        raise RuntimeError("\nInvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx\n...")
    compiled.step = no_compiler
    cache, logits = prefill(lm, torch.zeros(1, 3, dtype=torch.long), None, 4, {}, static=True)
    with pytest.raises(RuntimeError, match=r"^--compile: torch.compile failed \(InvalidCxxCompiler: No working C\+\+ "
                       r"compiler found in torch._inductor.config.cpp.cxx\); decode without --compile$"):
        compiled(logits.argmax(-1), cache)
    assert cache.slot is None and cache.length == 3


def test_generate_compile_from_the_command_line(tmp_path):
    lm = tiny_lm(vocab=300)
    lm.config.max_seq_len = 512
    lm.save_pretrained(str(tmp_path / "lm"))
    from data import train_tokenizer
    train_tokenizer([{"text": "what color is the shape? red. is there a circle? yes."}] * 8, 300).save(
        str(tmp_path / "lm"))
    run = [sys.executable, "generate.py", "--model", str(tmp_path / "lm"), "--prompt", "what color?",
           "--max-new-tokens", "6"]
    eager = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
    compiled = subprocess.run(run + ["--compile"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert eager.returncode == compiled.returncode == 0, compiled.stderr[-2000:]
    assert compiled.stdout == eager.stdout
