"""runs.py: settings from presets and flags. (test_train.py runs the run folder, resume, the lock and
DDP end to end; test_data.py the checks of training samples.)"""

import os

import presets
import runs
import train


def test_settings_come_from_defaults_preset_phase_and_flags():
    cfg, spec = runs.load_settings(train.TrainConfig, presets.PRESETS, train.PHASES,
                                   ["--phase", "align", "--steps", "7", "--shuffle", "false"])
    assert (cfg.steps, cfg.shuffle, cfg.data, cfg.connector) == (7, False, "easy-vqa-captions", "pixel_shuffle")
    assert cfg.out == os.path.join("runs", "tiny-align")
    assert set(spec) == {"vision_config", "lm_config", "qformer_config", "tokenizer_vocab", "tokenizer_data",
                         "tokenizer_lowercase"}


def test_damaged_trainer_state_log_and_latest_are_one_line(tmp_path, capsys):
    import pytest
    import torch

    ckpt = tmp_path / "ckpt-1"
    ckpt.mkdir()
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    # seeded garbage: the weights-only unpickler fails on these with UnpicklingError, IndexError,
    # UnicodeDecodeError and KeyError (seeds 0-299 checked); each must be one error line
    import random
    garbage = [random.Random(seed).randbytes(256) for seed in range(300)]
    for content in garbage + [None, "tensor"]:
        if content == "tensor":
            torch.save(torch.zeros(3), ckpt / "trainer_state.pt")  # loads, but is no trainer state
        elif content is None:
            torch.save({"step": 1}, ckpt / "trainer_state.pt")  # a state without its keys
        else:
            (ckpt / "trainer_state.pt").write_bytes(content)
        with pytest.raises(SystemExit):
            runs.load_trainer_state(str(ckpt), optimizer)
        err = capsys.readouterr().err
        assert err.startswith("error: --resume:") and "damaged" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "log.jsonl").write_bytes(b'{"step": 1, "loss": 1.0}\n\xff\xfe{"step": 2}\n{"step": 3, "loss": 2.0}\n')
    runs.open_log(str(tmp_path), 2).close()  # a line that is not UTF-8 counts as torn
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    (tmp_path / "latest").mkdir()
    cfg = train.TrainConfig(out=str(tmp_path), data="easy-vqa-qa")
    with pytest.raises(SystemExit):
        runs.check_run(cfg, {}, 1)
    assert "latest is a folder" in capsys.readouterr().err
