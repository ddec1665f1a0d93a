"""The language model against transformers, its KV cache, MoE, NoPE/chunked layers and loading."""

import json
import os

import numpy as np
import pytest
import torch

from generate import generate
from checkpoints import CheckpointError
from model import LanguageModel, LMConfig, MoE

transformers = pytest.importorskip("transformers")


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5)
LLAMA_CASES = {
    "gqa-untied": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=500.0),
    # theta 1e4, head_dim 16: wavelengths 6, 20, 63, 199, 628, ... so with an original length of 128
    # the high (6, 20), medium (63) and low (199, ...) frequency bands of llama3 scaling all occur.
    "llama3-rope": dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=10000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
    "attention-bias": dict(num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True),
}


def hf_llama(tmp_path, **extra):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, **extra)).eval()
    if extra.get("attention_bias"):  # random biases, so that a dropped bias would show
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.1)
    hf.save_pretrained(tmp_path)
    hf.generation_config.eos_token_id = None  # greedy comparisons run the full length on both sides
    return hf, LanguageModel.from_pretrained(str(tmp_path))


def left_padded_batch(lengths, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


def hf_positions(mask):  # what transformers' generate passes for left padding
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_parity_logits_and_greedy(tmp_path, case):
    hf, ours = hf_llama(tmp_path, **LLAMA_CASES[case])
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = max_diff(hf(ids).logits, ours(ids))
    assert diff <= 1e-4, diff
    prompt = ids[:, :8]
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                         pad_token_id=0)[:, 8:]
    assert torch.equal(generate(ours, prompt, max_new_tokens=20), theirs)


def test_llama_parity_left_padding(tmp_path):
    hf, ours = hf_llama(tmp_path, **LLAMA_CASES["gqa-untied"])
    ids, mask = left_padded_batch([20, 13, 7])
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        mine = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert max_diff(theirs[real], mine[real]) <= 1e-4
    new = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(generate(ours, ids, 20, attention_mask=mask), new)


def test_qwen2_parity_with_qkv_bias(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=False)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    for name, p in hf.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["tie_word_embeddings"]  # older Qwen2 files leave it out; transformers then unties
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = LanguageModel.from_pretrained(str(tmp_path))
    assert ours.config.qkv_bias and not ours.config.o_bias and not ours.config.tie_embeddings
    ids = torch.randint(0, 128, (2, 30))
    with torch.no_grad():
        assert max_diff(hf(ids).logits, ours(ids)) <= 1e-4


def test_sharded_checkpoint(tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, num_key_value_heads=2)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    ours = LanguageModel.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert max_diff(hf(ids).logits, ours(ids)) <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_save_pretrained_loads_in_transformers(tmp_path, kind):
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=128,
                   tie_embeddings=kind == "llama", qkv_bias=kind == "qwen2", rope_theta=1000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    ours = LanguageModel(cfg).eval()
    ours.save_pretrained(str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(hf).__name__ == ("LlamaForCausalLM" if kind == "llama" else "Qwen2ForCausalLM")
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert max_diff(hf(ids).logits, ours(ids)) <= 1e-4
    again = LanguageModel.from_pretrained(str(tmp_path))
    assert again.config == ours.config
    with torch.no_grad():
        assert max_diff(again(ids), ours(ids)) == 0


# --- KV cache ------------------------------------------------------------------------------------

MOE_NOPE = LMConfig(vocab_size=96, dim=48, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64,
                    n_experts=4, top_k=2, moe_every=2, nope_every=2, attention_chunk=5)
DENSE = LMConfig(vocab_size=96, dim=48, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


@pytest.mark.parametrize("cfg", [DENSE, MOE_NOPE], ids=["dense", "moe-nope-chunked"])
def test_kv_cache_decoding_equals_full_forward(cfg):
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(ids)  # (B, T, V)
        cache = model.new_cache(2, 24)
        steps = [model(ids[:, :9], cache=cache)]  # prefill 9, then one token at a time
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(9, 24)]
    assert max_diff(torch.cat(steps, dim=1), full) <= 1e-5


@pytest.mark.parametrize("cfg", [DENSE, MOE_NOPE], ids=["dense", "moe-nope-chunked"])
def test_batched_left_padded_decode_equals_each_row_alone(cfg):
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    ids, mask = left_padded_batch([11, 4, 8], vocab=cfg.vocab_size)
    T = ids.shape[1]
    with torch.no_grad():
        cache = model.new_cache(3, T + 10)
        batched = [model(ids, attention_mask=mask, cache=cache, last_only=True)]
        tokens = batched[0][:, -1].argmax(-1)
        for _ in range(10):
            batched.append(model(tokens[:, None], cache=cache))
            tokens = batched[-1][:, -1].argmax(-1)
        batched = torch.cat(batched, dim=1)  # (B, 11, V)
        for b in range(3):
            row = ids[b:b + 1, mask[b].bool()]
            alone_cache = model.new_cache(1, T + 10)
            alone = [model(row, cache=alone_cache, last_only=True)]
            token = alone[0][:, -1].argmax(-1)
            for _ in range(10):
                alone.append(model(token[:, None], cache=alone_cache))
                token = alone[-1][:, -1].argmax(-1)
            assert max_diff(torch.cat(alone, dim=1)[0], batched[b]) <= 1e-5
    assert torch.equal(generate(model, ids, 10, attention_mask=mask)[1],
                       generate(model, ids[1:2, mask[1].bool()], 10)[0])


def test_bad_inputs_are_clear_errors():
    model = LanguageModel(DENSE).eval()
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.tensor([[5, 96]]))
    with pytest.raises(ValueError, match=r"lie in \[0, 96\), got -3"):  # the bad id itself, not the maximum
        model(torch.tensor([[5, -3]]))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.tensor([[5, 6]]), attention_mask=torch.ones(1, 3))
    cache = model.new_cache(2, 8)
    with pytest.raises(ValueError, match="batch size 2"):
        model(torch.tensor([[5, 6]]), cache=cache)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        generate(model, torch.tensor([[5, 6]]), max_new_tokens=0)


def test_prompt_longer_than_context_is_a_clear_error():
    model = LanguageModel(DENSE).eval()
    with pytest.raises(ValueError, match="context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed the context"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)


# --- MoE -----------------------------------------------------------------------------------------

def test_moe_runs_only_the_chosen_experts_and_matches_dense_reference():
    torch.manual_seed(0)
    moe = MoE(LMConfig(dim=16, hidden_dim=32, n_heads=2, n_kv_heads=2, n_experts=8, top_k=2))
    calls = []
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda mod, inp, out, e=e: calls.append((e, inp[0].shape[0])))
    x = torch.randn(1, 1, 16)
    out, _ = moe(x)
    assert len(calls) == 2 and sum(n for _, n in calls) == 2  # one token: exactly top_k experts ran
    calls.clear()
    x = torch.randn(2, 5, 16)
    out, _ = moe(x)
    probs = moe.router(x.view(10, 16)).softmax(-1)
    w, chosen = probs.topk(2, dim=-1)
    assert sorted(e for e, _ in calls) == sorted(set(chosen.flatten().tolist()))
    assert sum(n for _, n in calls) == 10 * 2  # every token visited k experts, no more
    w = w / w.sum(-1, keepdim=True)
    dense = torch.stack([moe.experts[e](x.view(10, 16)) for e in range(8)], dim=1)  # (N, E, D)
    expected = (dense.gather(1, chosen[..., None].expand(-1, -1, 16)) * w[..., None]).sum(1)
    expected = expected + moe.shared_expert(x.view(10, 16))
    assert max_diff(out.view(10, 16), expected) <= 1e-5


def test_moe_aux_loss_uniform_router_and_gradients():
    torch.manual_seed(0)
    moe = MoE(LMConfig(dim=16, hidden_dim=32, n_heads=2, n_kv_heads=2, n_experts=8, top_k=2))
    torch.nn.init.zeros_(moe.router.weight)  # uniform router: every expert has probability 1/8
    _, aux = moe(torch.randn(3, 7, 16))
    assert aux.item() == pytest.approx(2.0, abs=1e-6)  # Mixtral form: n_experts * sum f_e P_e = top_k
    torch.nn.init.normal_(moe.router.weight)
    out, aux = moe(torch.randn(3, 7, 16))
    assert aux.item() > 2.0  # an unbalanced router pays more
    out.square().mean().backward(retain_graph=True)  # through the routing weights
    assert moe.router.weight.grad.abs().sum() > 0
    moe.router.weight.grad = None
    aux.backward()  # through the balancing loss
    assert moe.router.weight.grad.abs().sum() > 0
    model = LanguageModel(MOE_NOPE)
    logits, aux = model(torch.randint(0, 96, (2, 12)), return_aux=True)
    (logits.mean() + aux).backward()
    assert all(model.layers[i].mlp.router.weight.grad is not None for i in (1, 3))


# --- NoPE and chunked attention ------------------------------------------------------------------

def test_rope_layer_cannot_see_past_its_chunk_and_nope_layer_can():
    def changed_positions(nope_every):
        torch.manual_seed(0)
        cfg = LMConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=32,
                       max_seq_len=32, nope_every=nope_every, attention_chunk=4)
        model = LanguageModel(cfg).eval()
        ids = torch.randint(0, 50, (1, 12))
        other = ids.clone()
        other[0, 2] = (ids[0, 2] + 1) % 50  # change the token at position 2 (chunk 0 = positions 0..3)
        with torch.no_grad():
            delta = (model(ids) - model(other)).abs().amax(-1)[0]  # (T,)
        return [t for t in range(12) if delta[t] > 1e-6]

    assert changed_positions(nope_every=2) == [2, 3]  # layer 0 uses RoPE: chunked, later chunks blind
    assert changed_positions(nope_every=1) == list(range(2, 12))  # layer 0 is NoPE: full causal


# --- Bad checkpoints -----------------------------------------------------------------------------

def test_bad_checkpoints_give_one_line_errors(tmp_path):
    hf_llama(tmp_path / "good", **LLAMA_CASES["gqa-untied"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    cases = {"empty": "no model.safetensors"}
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    cases["bert"] = "'bert' model"
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    data = (tmp_path / "good" / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["trunc"] = "truncated or corrupt"
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "good" / "model.safetensors")
    state["extra.weight"] = state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, missing / "model.safetensors")
    cases["missing"] = r"missing keys \['model.layers.1.mlp.up_proj.weight'\], unexpected keys \['extra.weight'\]"
    nohidden = tmp_path / "nohidden"
    nohidden.mkdir()
    cfg = json.loads((tmp_path / "good" / "config.json").read_text())
    del cfg["hidden_size"]
    (nohidden / "config.json").write_text(json.dumps(cfg))
    cases["nohidden"] = "config.json lacks 'hidden_size'"
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as e:
            LanguageModel.from_pretrained(str(tmp_path / name))
        assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="no such folder"):
        LanguageModel.from_pretrained(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("layout, change, message", [
    ("llama", lambda cfg: [cfg], r"config.json: expected a JSON object \{...\}, got a list"),
    ("llama", lambda cfg: cfg.update(hidden_size="48"), 'config.json: dim must be int, not "48"'),
    ("llama", lambda cfg: cfg.update(num_attention_heads=None), "config.json: n_heads must be int, not null"),
    ("llama", lambda cfg: cfg.update(rms_norm_eps="1e-5"), 'config.json: norm_eps must be float, not "1e-5"'),
    ("llama", lambda cfg: cfg.update(hidden_act="relu"), "config.json: hidden_act 'relu' is not supported"),
    ("llama", lambda cfg: cfg.update(num_key_value_heads=0, num_attention_heads=0), r"n_heads \(0\) and n_kv_heads"),
    ("glimpse_lm", lambda cfg: cfg.update(n_expert=4), "config.json: unknown key 'n_expert'"),
    ("glimpse_lm", lambda cfg: cfg.update(top_k=True), "config.json: top_k must be int, not true"),
])
def test_malformed_config_json_is_one_line(tmp_path, layout, change, message):
    """The README promises a one-line CheckpointError for a bad config.json, never a traceback."""
    LanguageModel(DENSE if layout == "llama" else MOE_NOPE).save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(change(cfg) or cfg))  # edited in place, or a new one
    with pytest.raises(CheckpointError, match=message) as e:
        LanguageModel.from_pretrained(str(tmp_path))
    assert "\n" not in str(e.value)


def test_shape_mismatch_is_named(tmp_path):
    hf_llama(tmp_path, **LLAMA_CASES["gqa-untied"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"layers.0.mlp.gate_proj.weight: checkpoint shape \(96, 64\)"):
        LanguageModel.from_pretrained(str(tmp_path))


# --- GGUF ----------------------------------------------------------------------------------------

def permute_like_llama_cpp(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, hf, arch="llama"):
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in hf.state_dict().items():
        a = t.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj" in name:
            a = permute_like_llama_cpp(a, c.num_attention_heads)
        if arch == "llama" and ".k_proj" in name:
            a = permute_like_llama_cpp(a, c.num_key_value_heads)
        base, suffix = name.rsplit(".", 1)
        if base.startswith("model.layers."):
            i, rest = base.split(".", 3)[2:]
            gname = f"blk.{i}.{names[rest]}.{suffix}"
        else:
            gname = f"{names[base]}.{suffix}"
        w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_unpermutes_q_and_k(tmp_path):
    hf, _ = hf_llama(tmp_path / "hf", **LLAMA_CASES["gqa-untied"])
    write_tiny_gguf(tmp_path / "tiny.gguf", hf)
    ours = LanguageModel.from_pretrained(str(tmp_path / "tiny.gguf"))
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert max_diff(hf(ids).logits, ours(ids)) <= 1e-4


def test_gguf_qwen2_keeps_q_and_k_and_biases(tmp_path):
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, num_key_value_heads=2,
                                                                tie_word_embeddings=False)).eval()
    for name, p in hf.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)
    write_tiny_gguf(tmp_path / "qwen.gguf", hf, arch="qwen2")
    ours = LanguageModel.from_pretrained(str(tmp_path / "qwen.gguf"))
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert max_diff(hf(ids).logits, ours(ids)) <= 1e-4


def test_gguf_of_another_architecture_is_refused(tmp_path):
    hf, _ = hf_llama(tmp_path / "hf", **LLAMA_CASES["gqa-untied"])
    write_tiny_gguf(tmp_path / "falcon.gguf", hf, arch="falcon")
    with pytest.raises(CheckpointError, match="GGUF architecture 'falcon' is not supported"):
        LanguageModel.from_pretrained(str(tmp_path / "falcon.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        LanguageModel.from_pretrained(str(tmp_path / "junk.gguf"))


def test_real_smollm2_gguf_answers_paris_like_transformers(smollm2_gguf):
    from processing import Tokenizer, build_prompt

    path = smollm2_gguf
    ours = LanguageModel.from_pretrained(path)
    tok = Tokenizer.from_pretrained(path)
    prompt = torch.tensor([build_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])])
    mine = generate(ours, prompt, max_new_tokens=32)[0]
    assert "Paris" in tok.decode(mine.tolist())
    # transformers dequantizes the same GGUF with its own loader (and its own q/k un-permutation).
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    hf.generation_config.eos_token_id = None  # neither side stops early: all 32 tokens are compared
    theirs = hf.eval().generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                do_sample=False)[0, prompt.shape[1]:]
    assert len(mine) == len(theirs) == 32 and torch.equal(mine, theirs)


def test_unreachable_hub_is_one_clear_sentence(monkeypatch):
    import checkpoints

    def offline(repo_id, allow_patterns):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(checkpoints, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="could not get HuggingFaceTB/SmolLM2-135M from the Hugging Face hub"):
        LanguageModel.from_pretrained("HuggingFaceTB/SmolLM2-135M")


@pytest.mark.parametrize("change, message", [
    ({"rope_theta": float("nan")}, "rope_theta must be a positive number"),
    ({"rope_theta": -1.0}, "rope_theta must be a positive number"),
    ({"norm_eps": -1.0}, "norm_eps must be a positive number"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type default, linear"),
])
def test_config_values_that_would_answer_garbage_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        LMConfig(**{**DENSE.__dict__, **change})
