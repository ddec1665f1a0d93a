"""train.py end to end on the tiny preset with a slice of easy-VQA: phases through the CLI, exact
resume, checkpoints that survive SIGKILL, DDP with two processes, and clear errors."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("easy_vqa")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--preset", "tiny", "--limit", "64", "--batch-size", "8", "--micro-batch", "4", "--eval-every", "5",
        "--eval-batches", "1", "--warmup", "2", "--dtype", "float32"]  # runs compared with each other: not measured


def run(*args, env=None, check=True):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "log.jsonl"))]


def latest(run_dir):
    return os.path.join(run_dir, open(os.path.join(run_dir, "latest")).read().strip())


def test_align_then_instruct_then_generate(tmp_path):
    align, instruct = str(tmp_path / "align"), str(tmp_path / "instruct")
    said = run("--phase", "align", "--out", align, "--steps", "10", *FAST[:-2], "--dtype", "auto").stdout  # not tiny's
    chosen = re.search(r"--dtype auto: a training step took \S+ s in float32, \S+ s in bfloat16 "
                       r"\(taken if under 95%\): (\w+)", said)
    assert chosen and json.load(open(os.path.join(latest(align), "train_config.json")))["dtype"] == chosen[1]
    said = run("--phase", "align", "--out", align, "--steps", "11", "--resume", *FAST[:-2], "--dtype", "auto").stdout
    assert "--dtype auto" not in said  # resumed in the dtype the run chose, not measured again
    run("--phase", "instruct", "--init", align, "--out", instruct, "--steps", "30", "--lr", "1e-3", "--data", "easy-vqa-qa",
        *FAST)  # the preset's LM lr (5e-5) is for 1,700 steps; ten of them leave the answer empty
    for run_dir, steps in ((align, 11), (instruct, 30)):
        curve = losses(run_dir)
        assert len(curve) == steps and sum(curve[-3:]) / 3 < sum(curve[:3]) / 3  # the loss falls
        assert os.path.isfile(os.path.join(run_dir, "loss.png"))
    ckpt = latest(instruct)
    assert sorted(os.listdir(ckpt)) == sorted([
        "config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
        "train_config.json", "trainer_state.pt"])
    from easy_vqa import get_test_image_paths

    image = get_test_image_paths()[0]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", instruct, "--image", image,
                          "--prompt", "What color is the shape?", "--max-new-tokens", "5",
                          "--attention", str(tmp_path / "looked.png")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # it answered something
    assert "attention on image tokens" in out.stderr and (tmp_path / "looked.png").stat().st_size > 10_000


def test_resume_gives_the_uninterrupted_run(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    common = ["--phase", "instruct", "--steps", "20", "--save-every", "100", *FAST]  # the LM trains too
    run(*common, "--out", straight)
    run(*common, "--out", resumed, "--stop-after", "10")
    assert len(losses(resumed)) == 10
    run(*common, "--out", resumed, "--resume")
    assert losses(resumed) == losses(straight)  # bit for bit
    a, b = load_file(os.path.join(latest(straight), "model.safetensors")), \
        load_file(os.path.join(latest(resumed), "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """A run killed in the middle of writing checkpoint 4 still has checkpoint 2, whole and loadable."""
    out = str(tmp_path / "run")
    code = f"""
import sys, time, checkpoints
sys.argv = ["train.py", "--phase", "align", "--out", {out!r}, "--steps", "6", "--save-every", "2", *{FAST!r}]
real = checkpoints.write_safetensors
calls = []
def slow(state, path):
    calls.append(path)
    if len(calls) == 2:  # the second checkpoint: write half of it, then hang until killed
        open(path + ".tmp", "wb").write(b"partial")
        print("SAVING", flush=True)
        time.sleep(60)
    real(state, path)
checkpoints.write_safetensors = slow  # what every save_pretrained writes model.safetensors with
import train; train.main()
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    for line in proc.stdout:
        if "SAVING" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = latest(out)
    assert ckpt.endswith("ckpt-2")
    from vlm import VLM

    VLM.from_pretrained(ckpt)  # loads: the killed save never touched it
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    assert state["step"] == 2
    run("--phase", "align", "--out", out, "--steps", "6", "--save-every", "2", "--resume", *FAST)
    assert len(losses(out)) == 6 and latest(out).endswith("ckpt-6")


def test_ddp_two_processes_give_the_single_process_losses(tmp_path):
    single, double = str(tmp_path / "single"), str(tmp_path / "double")
    # The tower stays frozen: its ConvStem's BatchNorm normalises each process's samples by themselves,
    # so a training tower would see other batch statistics in two processes than in one.
    common = ["--phase", "align", "--steps", "4", "--save-every", "100", "--train-vision", "false", *FAST]
    run(*common, "--out", single)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(ROOT, "train.py"), *common, "--out", double],
                            capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(double) == pytest.approx(losses(single), abs=1e-4)


def test_bad_input_is_one_clear_line_and_nothing_is_overwritten(tmp_path):
    def error(*args):
        result = run(*args, check=False)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        return lines[0]

    assert "unknown phase 'fly'" in error("--phase", "fly")
    assert "unknown preset 'huge'" in error("--preset", "huge")
    (tmp_path / "bad.toml").write_text("stepz = 3\n")
    assert "unknown setting(s) ['stepz']" in error("--config", str(tmp_path / "bad.toml"))
    assert "no-such-data" in error("--phase", "align", "--data", str(tmp_path / "no-such-data"), "--out",
                                   str(tmp_path / "x"), *FAST)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    assert "'bert'" in error("--phase", "align", "--init", str(tmp_path / "bert"), "--out", str(tmp_path / "y"), *FAST)
    done = str(tmp_path / "done")
    run("--phase", "align", "--out", done, "--steps", "2", *FAST)
    before = open(os.path.join(done, "log.jsonl")).read()
    assert "already holds a run" in error("--phase", "align", "--out", done, "--steps", "2", *FAST)
    assert "these differ from it: lr" in error("--phase", "align", "--out", done, "--resume", "--lr", "0.5", *FAST)
    assert open(os.path.join(done, "log.jsonl")).read() == before


@pytest.mark.parametrize("lora", [False, True], ids=["frozen-copy", "lora-off"])
def test_dpo_phase_starts_at_log2_and_trains(tmp_path, lora):
    import math

    instruct, dpo = str(tmp_path / "instruct"), str(tmp_path / "dpo")
    run("--phase", "instruct", "--out", instruct, "--steps", "3", *FAST)
    extra = ["--lora-r", "4"] if lora else []
    # --rpo-alpha 0: the DPO loss alone (the tiny preset adds RPO's NLL term, which is not 0 at the start)
    run("--phase", "dpo", "--init", instruct, "--out", dpo, "--steps", "4", "--rpo-alpha", "0", *FAST, *extra)
    rows = [json.loads(line) for line in open(os.path.join(dpo, "log.jsonl"))]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[0]["margin"] == pytest.approx(0, abs=1e-6)
    assert "val_accuracy" in rows[-1] and "val_margin" in rows[-1]
    files = os.listdir(latest(dpo))
    assert ("adapter_model.safetensors" in files) == lora
    from vlm import VLM

    VLM.from_pretrained(latest(dpo))  # the adapter (if any) merges at load


def test_qformer_phase_then_a_qformer_vlm_through_align_and_instruct(tmp_path):
    stage1, align, instruct = str(tmp_path / "qformer"), str(tmp_path / "align"), str(tmp_path / "instruct")
    result = run("--phase", "qformer", "--out", stage1, "--steps", "6", "--itm", *FAST)
    assert "i2t_R@1" in result.stdout and os.path.isfile(os.path.join(stage1, "similarity_grid.png"))
    report = json.load(open(os.path.join(stage1, "retrieval.json")))
    assert 0 <= report["i2t_R@1"] <= report["i2t_R@5"] <= report["i2t_R@10"] <= 1
    assert losses(stage1)[-1] < losses(stage1)[0]
    run("--phase", "align", "--init", stage1, "--out", align, "--steps", "4", *FAST)
    run("--phase", "instruct", "--init", align, "--out", instruct, "--steps", "4", "--lora-r", "4", *FAST)
    from vlm import VLM

    vlm = VLM.from_pretrained(latest(instruct))
    assert vlm.config.connector == "qformer" and vlm.config.tokens_per_image() == vlm.config.qformer.n_queries


def test_a_short_run_learns_to_look_at_the_image(tmp_path, monkeypatch, one_thread):
    """Training works when the model answers from the picture: after a short run on colour questions
    the loss has fallen, and on held-out test images the answers with the image beat the same
    model's answers without it (which can only guess from the wording)."""
    import data
    import easyvqa
    import presets
    import train
    from cli import load
    from evaluate import answer_questions

    def colour_questions(split="train", limit=None):
        return [s for s in easyvqa.easy_vqa_qa(split) if s["messages"][1]["content"] in easyvqa.EASY_VQA_COLORS][:limit]

    monkeypatch.setitem(data.SOURCES, "colour-questions", colour_questions)
    cfg = train.TrainConfig(phase="instruct", preset="tiny", connector="pixel_shuffle", template="chatml-plain",
                            data="colour-questions", out=str(tmp_path / "run"), steps=500, batch_size=16,
                            micro_batch=16, max_len=48, lr=1e-3, lr_connector=1e-3, lr_vision=1e-3, warmup=10,
                            train_vision=True, eval_every=1000, eval_batches=1, save_every=1000, dtype="float32")
    spec = {"vision_config": {**presets.TINY_VISION, "dim": 64, "n_layers": 1, "n_heads": 2, "hidden_dim": 128},
            "lm_config": {**presets.TINY_LM, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128},
            "tokenizer_vocab": 300, "tokenizer_data": "easy-vqa-qa"}
    train.train(cfg, spec)
    curve = losses(cfg.out)
    assert sum(curve[-10:]) / 10 < 0.5 * sum(curve[:10]) / 10
    model, tok, processor, template = load(latest(cfg.out), torch.float32, "cpu")
    held_out = colour_questions("test", limit=64)
    answers = [s["messages"][1]["content"] for s in held_out]
    looked, blind = (answer_questions(model, tok, processor, template, held_out, image=image, progress=False)
                     for image in (True, False))
    accuracy = {name: sum(p == a for p, a in zip(predictions, answers)) / len(answers)
                for name, predictions in (("image", looked), ("no image", blind))}
    assert accuracy["image"] >= accuracy["no image"] + 0.25, accuracy  # seeds 0-2 here: +0.39, +0.56, +0.53


def tiny_vlm(n_layers=1):
    from model import LMConfig
    from siglip import VisionConfig
    from vlm import VLM, VLMConfig

    torch.manual_seed(0)
    return VLM(VLMConfig(  # one image token per image
        vision=VisionConfig(image_size=16, patch_size=8, dim=16, n_layers=1, n_heads=2, hidden_dim=32),
        lm=LMConfig(vocab_size=64, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64),
        connector="pixel_shuffle", image_token_id=63))


def test_kept_features_run_a_frozen_tower_once_per_image_and_give_its_output():
    import data

    model = tiny_vlm().eval()
    images = []  # how many images each pass of the tower gets: one at a time
    model.vision.register_forward_hook(lambda module, args, out: images.append(len(args[0])))
    kept = data.KeptFeatures(model)
    a, b = torch.randn(2, 3, 16, 16), torch.randn(1, 3, 16, 16)
    first = kept(a)
    second = kept(torch.cat([b, a[1:], a[:1]]))  # one new image, then the two seen ones
    assert images == [1, 1, 1]
    with torch.no_grad():
        torch.testing.assert_close(first, model.vision(a))
        torch.testing.assert_close(second, torch.cat([model.vision(b), model.vision(a)[[1, 0]]]))


def test_kept_features_give_the_losses_of_a_tower_run_every_step(tmp_path):
    common = ["--phase", "instruct", "--steps", "16", "--train-vision", "false", *FAST]  # 8 steps an epoch
    kept, recomputed = str(tmp_path / "kept"), str(tmp_path / "recomputed")
    assert "features kept per image" in run(*common, "--out", kept).stdout
    assert "features kept" not in run(*common, "--out", recomputed, "--keep-features", "false").stdout
    assert losses(kept) == pytest.approx(losses(recomputed), rel=0, abs=1e-5)


def test_lora_in_the_top_layer_with_the_connector_frozen_stops_the_backward_below_it():
    import train

    ids = torch.tensor([[63, 5, 9, 12, 7, 30], [63, 8, 2, 41, 3, 11]])
    pixels = torch.randn(2, 3, 16, 16)
    grads = {}
    for top, connector in ((0, True), (1, False)):
        model = train.set_trainable(tiny_vlm(n_layers=3), train.TrainConfig(
            phase="instruct", lora_r=4, lora_targets="all-linear", lora_dropout=0.0, lora_layers=top,
            train_connector=connector))
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        g = torch.Generator().manual_seed(1)  # the top layer's lora_A alike in both models
        for name, p in model.named_parameters():
            if name.startswith("lm.layers.2.") and "lora_A" in name:
                p.data.copy_(torch.randn(p.shape, generator=g))
        outputs = {}  # each layer's output: does the backward pass reach it?
        for i, layer in enumerate(model.lm.layers):
            layer.register_forward_hook(lambda module, args, out, i=i: outputs.__setitem__(i, out[0]))
        model(ids, pixel_values=pixels).logsumexp(-1).sum().backward()
        grads[top] = {name: p.grad for name, p in model.named_parameters() if name.startswith("lm.layers.2.")
                      and "lora_B" in name}
    assert all(name.startswith("lm.layers.2.") and "lora_" in name for name in trainable)  # the top layer's LoRA
    assert [outputs[i].requires_grad for i in range(3)] == [False, False, True]  # no backward below it
    assert grads[1].keys() == grads[0].keys() and len(grads[1]) == 7  # q k v o gate up down
    for name in grads[1]:  # lora_B starts at zero: the lower adapters change nothing, the gradients agree
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6)


def test_without_shuffling_batches_follow_the_data_order_epoch_after_epoch():
    import data
    import train

    cfg = train.TrainConfig(batch_size=4, shuffle=False)
    assert [data.global_batch(10, step, cfg) for step in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    shuffled = [i for step in range(5) for i in data.global_batch(10, step, train.TrainConfig(batch_size=4))]
    assert sorted(shuffled[:10]) == list(range(10)) and shuffled[:10] != list(range(10))


def one_error_line(result) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr-vision", "inf"], "--lr-vision must be a positive number"),
    (["--warmup", "-1"], "--warmup must be 0 or more"),
    (["--min-lr-ratio", "-0.5"], "--min-lr-ratio must lie in [0, 1.0]"),
    (["--weight-decay", "nan"], "--weight-decay must be 0 or more"),
    (["--batch-size", "10", "--micro-batch", "4"], "--batch-size 10 must be a multiple of --micro-batch 4"),
    (["--stepz", "3"], "unrecognized arguments: --stepz"),
    (["--lora-layers", "-1"], "--lora-layers must be 0 or more"),
    (["--train-connector", "false", "--train-vision", "false"], "align trains the connector (and, with"),
])
def test_bad_settings_are_refused_in_one_line(tmp_path, flags, message):
    result = run("--phase", "align", "--out", str(tmp_path / "x"), *flags, check=False)
    assert message in one_error_line(result) and "usage:" not in result.stderr
    assert not os.path.exists(tmp_path / "x" / "log.jsonl")


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    result = run("--phase", "align", "--out", out, "--steps", "8", "--save-every", "1", "--lr-connector", "1e30",
                 *FAST, check=False)
    error = one_error_line(result)
    step = int(error.split("step ")[1].split(":")[0])
    assert "the loss is nan" in error and latest(out).endswith(f"ckpt-{step - 1}") and latest(out) in error
    assert len(losses(out)) == step - 1
    short = run("--phase", "align", "--out", str(tmp_path / "short"), "--steps", "2", "--max-len", "5", *FAST,
                check=False)
    assert "sample 0: its first image's placeholders end at token 20, past max_len=5" in one_error_line(short)
    short = run("--phase", "align", "--out", str(tmp_path / "shorter"), "--steps", "2", "--max-len", "21", *FAST,
                check=False)
    assert "step 1: no sample of the batch has a reply token within --max-len 21" in one_error_line(short)


def image_caption_folder(folder, n: int, bad: dict) -> str:
    """n red squares with captions; `bad` maps an index to the bytes of a damaged image."""
    from PIL import Image

    folder.mkdir()
    with open(folder / "captions.jsonl", "w") as f:
        for i in range(n):
            Image.new("RGB", (32, 32), (200, 0, 0)).save(folder / f"{i}.png")
            if i in bad:
                (folder / f"{i}.png").write_bytes(bad[i])
            f.write(json.dumps({"image": f"{i}.png", "caption": "A red square."}) + "\n")
    return str(folder)


def test_bad_images_are_all_named_before_step_1(tmp_path):
    folder = image_caption_folder(tmp_path / "data", 12, {3: b"", 7: b"\x89PNG\r\n\x1a\n truncated"})
    result = run("--phase", "align", "--data", folder, "--out", str(tmp_path / "run"), "--steps", "2", *FAST,
                 check=False)
    error = one_error_line(result)
    assert "2 sample(s) with unreadable images" in error and "3.png" in error and "7.png" in error
    assert not os.path.exists(tmp_path / "run" / "log.jsonl")  # not a step was taken


def test_hub_streams_skip_unreadable_samples_and_count_them(monkeypatch):
    import data
    import runs
    import sources
    from PIL import Image

    good = sources.chat_sample([Image.new("RGB", (8, 8))], "q", "a")
    broken = sources.chat_sample([io.BytesIO(b"not an image")], "q", "a")
    stream = sources.Stream(lambda: iter([good, broken, good, broken, good]), "fake hub set")
    monkeypatch.setitem(data.SOURCES, "fake-hub", lambda split="train", limit=None: stream)
    samples, skipped = runs.read_samples("fake-hub", "train", 3)
    assert samples == [good, good, good] and skipped == 2


def test_local_data_without_a_test_split_holds_out_validation(tmp_path, capsys):
    import runs
    import train

    folder = image_caption_folder(tmp_path / "data", 40, {})
    cfg = train.TrainConfig(data=folder, eval_batches=1, batch_size=8, seed=3)
    train_set, val_set, _ = runs.load_data(cfg)
    assert len(val_set) == 2 and len(train_set) == 38  # 5%
    assert not {s["images"][0] for s in val_set} & {s["images"][0] for s in train_set}
    assert "2 of" in capsys.readouterr().out
    assert runs.load_data(cfg)[1] == val_set  # seeded


def test_one_run_folder_one_train_py_and_a_killed_run_leaves_no_stale_lock(tmp_path):
    out = str(tmp_path / "run")
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--phase", "align", "--out", out,
                              "--steps", "500", "--save-every", "2", *FAST], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.isfile(os.path.join(out, "latest"))):
        time.sleep(0.2)
    second = run("--phase", "align", "--out", out, "--steps", "500", "--save-every", "2", "--resume", *FAST,
                 check=False)
    assert f"{out} is in use by another train.py (pid {first.pid})" in one_error_line(second)
    first.send_signal(signal.SIGKILL)
    first.wait()
    run("--phase", "align", "--out", out, "--steps", str(int(latest(out).split("-")[-1]) + 2), "--save-every", "2",
        "--resume", *FAST)


def test_resume_recovers_from_a_damaged_run_folder(tmp_path):
    out = str(tmp_path / "run")
    run("--phase", "align", "--out", out, "--steps", "4", "--save-every", "2", *FAST)
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"step": 5, "lo')  # torn by a crash
    for pointer in ("", "ckpt-99", "../../elsewhere"):  # empty, dangling, outside the run
        open(os.path.join(out, "latest"), "w").write(pointer)
        import cli

        assert cli.latest_checkpoint(out) == os.path.join(out, "ckpt-4")
    run("--phase", "align", "--out", out, "--steps", "6", "--save-every", "2", "--resume", *FAST)
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))] == [1, 2, 3, 4, 5, 6]
    state = os.path.join(latest(out), "trainer_state.pt")
    open(state, "r+b").truncate(100)
    error = one_error_line(run("--phase", "align", "--out", out, "--steps", "8", "--resume", *FAST, check=False))
    assert "trainer_state.pt is damaged" in error
    os.remove(state)
    error = one_error_line(run("--phase", "align", "--out", out, "--steps", "8", "--resume", *FAST, check=False))
    assert "holds no checkpoint to resume from" in error


@pytest.mark.parametrize("signum, said", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path, signum, said):
    """Ctrl-C, and the SIGTERM that timeout, docker stop, Slurm and Kubernetes send: the step under way
    ends, a checkpoint is saved, one line says how to resume, the exit status is 128 + the signal."""
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--phase", "align", "--out", out,
                             "--steps", "500", "--save-every", "1000", *FAST], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.isfile(os.path.join(out, "log.jsonl")) or \
            not open(os.path.join(out, "log.jsonl")).read():
        time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    step = int(latest(out).split("-")[-1])
    assert f"{said} at step {step}; --resume continues" in stderr and "Traceback" not in stderr
    run("--phase", "align", "--out", out, "--steps", str(step + 2), "--resume", *FAST)
    assert len(losses(out)) == step + 2


def test_help_names_the_choices():
    shown = " ".join(run("--help").stdout.split())
    for name in ("pretrain, qformer, align, instruct, dpo", "tiny, offline", "pixel_shuffle", "cls_gate", "chatml",
                 "zephyr", "easy-vqa-curriculum", "sigmoid, ipo"):
        assert name in shown, name


# ---------------------------------------------------------------------------------------------
# Hostile starts: DPO from what is not a VLM of its preset, a moved reference, a full disk
# ---------------------------------------------------------------------------------------------


def test_dpo_refuses_a_start_that_is_not_a_vlm_of_its_preset(tmp_path):
    """An LM-only run (with or without LoRA) or a VLM of other widths would be tuned with a random tower."""
    import presets
    import runs
    import train
    from easyvqa import easy_vqa_text

    pretrain = str(tmp_path / "pretrain")
    run("--phase", "pretrain", "--out", pretrain, "--steps", "1", *FAST)
    for extra in ([], ["--lora-r", "4"]):
        error = one_error_line(run("--phase", "dpo", "--init", pretrain, "--out", str(tmp_path / "dpo"),
                                   "--steps", "2", *FAST, *extra, check=False))
        assert "tunes a vision-language model" in error and "is a language model" in error, error
    cfg = train.TrainConfig(phase="instruct", connector="pixel_shuffle", template="chatml-plain")
    spec = {"vision_config": {**presets.TINY_VISION, "dim": 32, "n_layers": 1, "n_heads": 2, "hidden_dim": 64},
            "lm_config": {**presets.TINY_LM, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
            "tokenizer_vocab": 300}
    model, tokenizer, processor = train.start_model(cfg, spec, easy_vqa_text("test", limit=50))
    other = str(tmp_path / "other")
    runs.save_checkpoint(other, 1, model, tokenizer, processor, torch.optim.AdamW(model.parameters()), cfg)
    error = one_error_line(run("--phase", "dpo", "--init", other, "--out", str(tmp_path / "dpo2"), "--steps", "2",
                               *FAST, check=False))
    assert "not the tiny preset's" in error and "'dim': 32" in error, error
    assert not os.path.exists(tmp_path / "dpo2" / "log.jsonl")


def test_qformer_phase_refuses_a_vlm_with_another_connector(tmp_path):
    align = str(tmp_path / "align")
    run("--phase", "align", "--out", align, "--steps", "1", *FAST)
    error = one_error_line(run("--phase", "qformer", "--init", align, "--out", str(tmp_path / "q"), "--steps", "1",
                               *FAST, check=False))
    assert "already has a pixel_shuffle connector" in error, error


def test_dpo_resume_equals_an_uninterrupted_run_and_refuses_a_changed_reference(tmp_path):
    instruct, whole, split = str(tmp_path / "instruct"), str(tmp_path / "whole"), str(tmp_path / "split")
    run("--phase", "instruct", "--out", instruct, "--steps", "2", *FAST)
    dpo = ["--phase", "dpo", "--init", instruct, "--steps", "4", "--save-every", "100", *FAST]
    run(*dpo, "--out", whole)
    run(*dpo, "--out", split, "--stop-after", "2")
    run(*dpo, "--out", split, "--resume")
    assert losses(split) == losses(whole)  # bit for bit
    run(*dpo, "--out", split + "2", "--stop-after", "2")
    run("--phase", "instruct", "--out", instruct, "--steps", "3", "--resume", *FAST)  # --init's latest moves on
    error = one_error_line(run(*dpo, "--out", split + "2", "--resume", check=False))
    assert "has moved or changed since it started" in error, error


def test_a_full_disk_is_one_line_leaves_no_temporary_files_and_resume_works_once_freed(tmp_path):
    out = str(tmp_path / "run")
    code = f"""
import errno, sys, checkpoints
sys.argv = ["train.py", "--phase", "align", "--out", {out!r}, "--steps", "4", "--save-every", "2", *{FAST!r}]
real, calls = checkpoints.write_safetensors, []
def full(state, path):
    calls.append(path)
    if len(calls) == 2:  # the second checkpoint finds the disk full
        open(path, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    real(state, path)
checkpoints.write_safetensors = full
import train; train.main()
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    error = one_error_line(result)
    assert "No space left on device" in error and "ckpt-2" in error and "MiB free" in error, error
    assert "Traceback" not in result.stderr
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    assert latest(out).endswith("ckpt-2")
    run("--phase", "align", "--out", out, "--steps", "4", "--save-every", "2", "--resume", *FAST)
    assert len(losses(out)) == 4 and latest(out).endswith("ckpt-4")
