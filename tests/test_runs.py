"""runs.py: settings from presets and flags. (test_train.py runs the run folder, resume, the lock and
DDP end to end; test_data.py the checks of training samples.)"""

import os

import runs
import train


def test_settings_come_from_defaults_preset_phase_and_flags():
    cfg, spec = runs.load_settings(train.TrainConfig, runs.PRESETS, train.PHASES,
                                   ["--phase", "align", "--steps", "7", "--shuffle", "false"])
    assert (cfg.steps, cfg.shuffle, cfg.data, cfg.connector) == (7, False, "easy-vqa-captions", "pixel_shuffle")
    assert cfg.out == os.path.join("runs", "tiny-align")
    assert set(spec) == {"vision_config", "lm_config", "qformer_config", "tokenizer_vocab", "tokenizer_data",
                         "tokenizer_lowercase"}
