"""quantize.py: the int8 and int4 kernels against their own dequantized weights, a tiny LM against
float32, and the real SmolLM2 by perplexity (bench.py decode measures the speed)."""

from copy import deepcopy

import pytest
import torch

from model import LanguageModel, LMConfig, finish_loading


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_int8_and_int4_linears_compute_with_their_dequantized_weights():
    from quantize import Int4Linear, Int8Linear

    torch.manual_seed(0)
    w, b, x = torch.randn(48, 64), torch.randn(48), torch.randn(2, 5, 64)
    int8 = Int8Linear(w, b)
    dequant8 = int8.q.float() * int8.scale[:, None]  # (out, in)
    assert max_diff(int8(x), x @ dequant8.t() + b) <= 1e-4
    assert (dequant8 - w).abs().max() <= w.abs().amax(1, keepdim=True).max() / 254 + 1e-6  # half a step
    int4 = Int4Linear.round(w, group=32, bias=b)
    dequant4 = int4(torch.eye(64)) - b  # (in, out): the identity reads the weights back
    assert max_diff(int4(x), x @ dequant4 + b) <= 1e-4
    steps = (w.view(48, 2, 32).amax(-1) - w.view(48, 2, 32).amin(-1)) / 15  # (out, groups)
    assert ((dequant4.t() - w).abs().view(48, 2, 32) <= steps[..., None] / 2 + 1e-5).all()
    q4_1 = torch.randint(0, 16, (48, 64)).float().view(48, 2, 32) * 0.1 - 0.7  # a grid llama.cpp's Q4_1 could hold
    q4_1[..., 0], q4_1[..., 1] = -0.7, -0.7 + 1.5  # each block spans q = 0..15, as Q4_1's min/max rounding makes it
    assert max_diff(Int4Linear.round(q4_1.view(48, 64))(torch.eye(64)), q4_1.view(48, 64).t()) <= 1e-5


# tolerances on the logits of a tiny random LM, as a share of the float32 logits' spread
QUANT_TOLERANCE = {"bfloat16": 0.05, "int8": 0.05, "int4": 0.6}  # measured 0.030, 0.030, 0.39


@pytest.mark.parametrize("mode", QUANT_TOLERANCE)
def test_bf16_int8_and_int4_logits_stay_close_to_float32(mode):
    from quantize import quantize

    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)
    lm = LanguageModel(cfg).eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = lm(ids)  # (B, T, V)
        if mode == "bfloat16":
            out = lm.to(torch.bfloat16)(ids).float()
        else:
            assert quantize(lm, mode) == []  # every layer quantized
            out = lm(ids)
    assert max_diff(out, ref) <= QUANT_TOLERANCE[mode] * ref.std().item()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_int4_keeps_float_weights_where_the_kernel_cannot():
    from quantize import Int4Linear, quantize

    cfg = LMConfig(vocab_size=100, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=40, max_seq_len=32)
    lm = LanguageModel(cfg).eval()
    kept = quantize(lm, "int4")
    assert kept == ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]  # 40 % 16, 40 % 32
    assert isinstance(lm.layers[0].attn.q_proj, Int4Linear)
    lm(torch.randint(0, 100, (1, 4)))  # runs


SMOLLM2_TEXT = (
    "The history of the city begins with a small settlement on the river, where fishermen and traders built wooden "
    "houses along the bank. Over the centuries the town grew into a busy port. Merchants brought wool, salt and "
    "wine, and the market square became the heart of public life. In the winter the river froze, and children "
    "skated on the ice while their parents carried bread and firewood across it. The old bridge, built of stone "
    "in the fourteenth century, still stands today, and every spring the town holds a fair on its banks.")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """The real SmolLM2 in float32, read once (dequantizing the GGUF takes seconds); tests copy it."""
    return LanguageModel.from_pretrained(smollm2_gguf).eval()


def variant(lm, dtype, mode=None):
    """A copy of `lm` in `dtype`, its linears quantized to `mode` (as from_pretrained(dtype) then quantize)."""
    from quantize import quantize

    copy = finish_loading(deepcopy(lm).to(dtype), "cpu")  # RoPE's frequencies stay float32, as loaded
    if mode:
        quantize(copy, mode)
    return copy


def test_smollm2_perplexity_bf16_int8_int4_within_one_percent(smollm2, smollm2_gguf):
    """The real SmolLM2-135M (Q4_1 GGUF): bf16 and int8 within 1% of float32's perplexity; int4
    within 1% of the GGUF's own weights dequantized to float32 (which is what float32 here is)."""
    from processing import Tokenizer

    ids = torch.tensor([Tokenizer.from_pretrained(smollm2_gguf).encode(SMOLLM2_TEXT)])  # (1, T)

    def perplexity(lm):
        with torch.no_grad():
            logits = lm(ids).float()  # (1, T, V)
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).exp().item()

    base = perplexity(smollm2)
    for dtype, mode in ((torch.bfloat16, None), (torch.float32, "int8"), (torch.bfloat16, "int8"),
                        (torch.float32, "int4"), (torch.bfloat16, "int4")):
        assert abs(perplexity(variant(smollm2, dtype, mode)) / base - 1) <= 0.01, (dtype, mode)


def test_int4_runs_the_q4_1_files_own_grid_and_keeps_float32s_greedy_tokens(smollm2, smollm2_gguf):
    """SmolLM2's Q4_1 GGUF: int4 holds the file's very 4-bit weights (re-rounding finds each block's
    d and m again), and with its Q8_0 head kept in float keeps float32's greedy tokens at least as
    long as bfloat16 does (both with bfloat16 activations)."""
    from generate import generate
    from quantize import Int4Linear
    from processing import Tokenizer, build_prompt

    weight = smollm2.layers[0].attn.q_proj.weight.detach().clone()  # (576, 576), the file's dequantized Q4_1
    int4 = Int4Linear.round(weight)
    with torch.no_grad():
        assert max_diff(int4(torch.eye(576)).t(), weight) <= 1e-6 * weight.abs().max().item()
    tok = Tokenizer.from_pretrained(smollm2_gguf)
    ids = torch.tensor([build_prompt(tok, [{"role": "user", "content": "Write a short story about a robot."}])])
    reference, agree = generate(smollm2, ids, 32), {}
    for mode in ("bfloat16", "int4"):
        lm = variant(smollm2, torch.bfloat16, None if mode == "bfloat16" else "int4")
        assert mode == "bfloat16" or lm.lm_head is None  # tied: int4 keeps the head, the embedding table, in float
        agree[mode] = int((generate(lm, ids, 32) == reference).cumprod(dim=1).sum())
    assert agree["int4"] >= agree["bfloat16"], agree  # measured: 28 and 28 (with the head in int8, int4: fewer)
