"""parallel.py: FSDP2 on 2 CPU processes (gloo) gives one process's losses and weights, with half the
parameter and AdamW bytes per process; its checkpoints resume exactly and load in one process;
activation checkpointing recomputes the blocks and leaves the losses as they were."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("easy_vqa")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny preset's tower is frozen here: its ConvStem's BatchNorm would normalize over each process's own
# share of the batch (SyncBatchNorm needs a GPU), and no data-parallel run can then match one process.
COMMON = ["--phase", "instruct", "--preset", "tiny", "--limit", "64", "--batch-size", "8", "--micro-batch", "4",
          "--eval-every", "5", "--eval-batches", "1", "--warmup", "2", "--dtype", "float32", "--steps", "5",
          "--save-every", "100", "--train-vision", "false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def one_process(*args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                       cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def two_processes(*args):  # --standalone: a free port of its own, as tests may run side by side (pytest -n)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True, cwd=ROOT,
                       env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def losses(run):
    return [json.loads(line)["loss"] for line in open(os.path.join(run, "log.jsonl"))]


def weights(run, name="model.safetensors"):
    return load_file(os.path.join(run, open(os.path.join(run, "latest")).read().strip(), name))


def held_mib(said):
    return float(re.search(r"parameters and AdamW state in this process: ([\d.,]+) MiB", said)[1].replace(",", ""))


def assert_same_run(a, b, name="model.safetensors", tol=1e-5):
    assert max(abs(x - y) for x, y in zip(losses(a), losses(b))) <= tol and len(losses(a)) == len(losses(b)) == 5
    wa, wb = weights(a, name), weights(b, name)
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= tol


@pytest.mark.parametrize("extra, file", [([], "model.safetensors"),
                                         (["--lora-r", "8", "--lora-dropout", "0"], "adapter_model.safetensors")])
def test_fsdp_on_two_processes_stopped_and_resumed_gives_one_processs_run_with_half_the_bytes(tmp_path, extra, file):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    alone = one_process(*COMMON, *extra, "--out", one)
    recompute = ["--activation-checkpointing"] if extra else []  # with LoRA: the blocks recompute too
    two_processes(*COMMON, *extra, *recompute, "--fsdp", "--out", two, "--stop-after", "3")  # stopped, as if killed
    sharded = two_processes(*COMMON, *extra, *recompute, "--fsdp", "--out", two, "--resume")
    assert "sharded (FSDP2)" in sharded and ("activations recomputed" in sharded) == bool(extra)
    assert_same_run(one, two, file)  # stopped after step 3 and resumed: the uninterrupted run's losses and weights
    shards = os.path.join(two, open(os.path.join(two, "latest")).read().strip(), "optimizer")
    assert os.path.isfile(os.path.join(shards, ".metadata")) and len(os.listdir(shards)) == 3  # one file a process
    assert 0.4 <= held_mib(sharded) / held_mib(alone) <= 0.6  # measured: 22.0 / 44.0 MiB, LoRA 9.2 / 18.3
    if extra:
        return
    from easy_vqa import get_test_image_paths
    r = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", two, "--image",
                        get_test_image_paths()[0], "--prompt", "What shape is it?", "--max-new-tokens", "4"],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr  # (5 steps: its answer may be empty)


def test_fsdp_in_one_process_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *COMMON, "--fsdp", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "error: --fsdp shards the model over processes: run it under torchrun with --nproc_per_node 2 or more "
        "(one process trains without it)"]


def test_activation_checkpointing_recomputes_the_blocks_and_keeps_loss_and_gradients():
    from model import LMConfig
    from parallel import recompute_activations
    from siglip import VisionConfig
    from vlm import VLM, VLMConfig
    torch.manual_seed(0)
    vlm = VLM(VLMConfig(vision=VisionConfig(image_size=16, patch_size=8, dim=16, n_layers=2, n_heads=2, hidden_dim=32),
                        lm=LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48),
                        connector="mlp", image_token_id=63))
    ids, pixels = torch.tensor([[1, 2] + [63] * 4 + [3, 4, 5]]), torch.randn(1, 3, 16, 16)
    calls, mlp = [], vlm.lm.layers[0].mlp.forward
    vlm.lm.layers[0].mlp.forward = lambda x: (calls.append(1), mlp(x))[1]  # (module hooks stay quiet in a recompute)
    results = {}
    for on, runs in ((False, 1), (True, 2)):  # checkpointed: the block runs again in the backward
        recompute_activations(vlm, on)
        vlm.zero_grad()
        calls.clear()
        loss = vlm(ids, pixel_values=pixels).logsumexp(-1).mean()
        loss.backward()
        assert len(calls) == runs and vlm.vision.checkpointing == on
        results[on] = loss.item(), {n: p.grad.clone() for n, p in vlm.named_parameters()}
    assert results[False][0] == results[True][0]
    assert all(torch.equal(results[False][1][n], results[True][1][n]) for n in results[False][1])
    vlm.eval()
    calls.clear()
    with torch.no_grad():
        vlm(ids, pixel_values=pixels)  # no training, no recomputation
    assert len(calls) == 1
