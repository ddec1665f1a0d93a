"""cli.py, the helpers the scripts share: one error line, the device check, a run folder's
`latest`, Recall@K. (The scripts' own tests run the rest end to end.)"""

import os

import pytest
import torch

import cli


def test_fail_is_one_line_and_exit_status_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.fail("two\n  lines")
    assert e.value.code == 2 and capsys.readouterr().err == "error: two lines\n"


def test_check_device_refuses_what_is_not_here():
    assert cli.check_device("cpu") == torch.device("cpu")
    for name in ("gpu", "cuda:99", "meta"):
        with pytest.raises(ValueError, match="--device"):
            cli.check_device(name)


def test_latest_checkpoint_ignores_a_pointer_outside_the_run(tmp_path):
    run = tmp_path / "run"
    for step in (2, 10):
        (run / f"ckpt-{step}").mkdir(parents=True)
        for name in cli.CHECKPOINT_FILES:
            (run / f"ckpt-{step}" / name).write_text("x")
    (tmp_path / "elsewhere").mkdir()
    (run / "latest").write_text("../elsewhere")
    assert cli.latest_checkpoint(str(run)) == os.path.join(run, "ckpt-10")  # newest whole one, by number
    (run / "latest").write_text("ckpt-2")
    assert cli.latest_checkpoint(str(run)) == os.path.join(run, "ckpt-2")
    assert cli.latest_checkpoint(str(tmp_path / "elsewhere")) is None


def test_recall_at_k_on_a_hand_made_ranking():
    sim = torch.tensor([[0.9, 0.1, 0.5],  # query 0: ranking 0, 2, 1
                        [0.2, 0.3, 0.8],  # query 1: ranking 2, 1, 0
                        [0.4, 0.6, 0.5]])  # query 2: ranking 1, 2, 0
    relevant = torch.tensor([[True, False, False], [True, False, False], [False, False, True]])
    r = cli.recall_at_k(sim, relevant, ks=(1, 2, 3))
    assert r == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
