"""autotune.py: the decoding product picked by timing F.linear against bmm over row blocks (same numbers
either way, one measurement per shape), and --dtype auto's choice by timing a step in each dtype."""

import time

import torch
import torch.nn.functional as F

import autotune
from autotune import fastest, faster_dtype, linear, row_blocks_linear


def test_row_blocks_give_f_linear_numbers():
    torch.manual_seed(0)
    w = torch.randn(96, 40)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)  # one block per thread, at least two
            for shape in [(1, 40), (1, 1, 40), (2, 2, 40), (3, 1, 40)]:
                x = torch.randn(shape)
                assert torch.allclose(row_blocks_linear(x, w), F.linear(x, w), atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_linear_measures_each_decoding_shape_once_and_keeps_the_faster(monkeypatch):
    torch.manual_seed(0)
    w, b = torch.randn(96, 40), torch.randn(96)
    monkeypatch.setattr(autotune, "CHOSEN", {})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # 96 rows split into one block per thread
    try:
        check_linear(w, b)
    finally:
        torch.set_num_threads(threads)


def check_linear(w, b):
    for shape in [(1, 40), (1, 1, 40), (2, 2, 40), (8, 40), (0, 40)]:  # 8 rows, none: F.linear, never timed
        x = torch.randn(shape)
        assert torch.allclose(linear(x, w, b), F.linear(x, w, b), atol=1e-5)
    assert sorted(key[1] for key in autotune.CHOSEN) == [1, 4]  # rows 1 (twice: measured once) and 4
    key = ((96, 40), 1, "cpu", torch.get_num_threads())
    choice = autotune.CHOSEN[key]
    assert choice.name in ("F.linear", "bmm row blocks") and choice.cost > 0
    assert choice.name == min(choice.times, key=choice.times.get)
    # What was measured is what runs: force each answer and look at the kernel the profiler sees.
    for name, bmm in (("bmm row blocks", True), ("F.linear", False)):
        autotune.CHOSEN[key] = autotune.Choice(name, {}, 0.0)
        with torch.profiler.profile() as prof:
            linear(torch.randn(1, 40), w)
        assert any(e.name == "aten::bmm" for e in prof.events()) == bmm
    for x, weight in [(torch.randn(1, 40), w.t().contiguous().t()), (torch.randn(1, 40).bfloat16(), w.bfloat16())]:
        with torch.profiler.profile() as prof:  # not contiguous, bfloat16: F.linear without a measurement
            linear(x, weight)
        assert not any(e.name == "aten::bmm" for e in prof.events())
    with torch.autocast("cpu", torch.bfloat16):  # F.linear's own bfloat16 product, as autocast asks
        assert linear(torch.randn(1, 40), w, b).dtype == torch.bfloat16


def test_fastest_keeps_the_faster_whichever_comes_first():
    slow, quick = (lambda: time.sleep(0.004)), (lambda: None)
    assert fastest({"slow": slow, "quick": quick}, repeats=2).name == "quick"
    assert fastest({"quick": quick, "slow": slow}, repeats=2).name == "quick"


def test_faster_dtype_times_both_drops_the_gradients_and_puts_the_rng_back():
    model = torch.nn.Linear(64, 64)
    calls = []

    def loss():  # slower in float32, and it draws random numbers
        calls.append(torch.is_autocast_enabled("cpu"))
        time.sleep(0.001 if calls[-1] else 0.006)
        return model(torch.rand(4, 64)).square().sum()

    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    choice = faster_dtype(model, loss)
    assert choice.name == "bfloat16" and set(choice.times) == {"float32", "bfloat16"}
    assert calls.count(True) == calls.count(False) == 4  # one warm-up and three timed each
    assert torch.equal(torch.rand(2), expected)  # the run goes on as if nothing had been timed
    assert all(p.grad is None for p in model.parameters())


def test_faster_dtype_keeps_float32_where_bfloat16_is_not_clearly_faster(monkeypatch):
    model = torch.nn.Linear(8, 8)
    loss = lambda: model(torch.rand(2, 8)).sum()  # noqa: E731
    for bf16_time, expected in [(0.97, "float32"), (0.90, "bfloat16")]:  # float32 takes 1.0
        measured = autotune.Choice("bfloat16", {"float32": 1.0, "bfloat16": bf16_time}, 0.0)
        monkeypatch.setattr(autotune, "fastest", lambda candidates, repeats: measured)
        assert faster_dtype(model, loss).name == expected
