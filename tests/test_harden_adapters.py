"""examples/harden_adapters.py: align's hardening rounds on adapters from `train` train with those
adapters' own settings (half the learning rate, as align's rounds), and bad input is one line."""

import json
from dataclasses import asdict

import pytest
from conftest import load_example

from mlx_safesig.adapters import ADAPTER_CONFIG
from mlx_safesig.train import TrainConfig

harden_adapters = load_example("harden_adapters")


def test_a_round_trains_with_the_adapters_settings_at_half_the_learning_rate(tmp_path):
    trained = TrainConfig(iters=300, batch_size=8, learning_rate=5e-5, lam=0.3, probes=0,
                          max_seq_length=768, warmup=20)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(
        {"safesig_training": {**asdict(trained), "a_setting_of_a_later_version": 1}}))
    config = harden_adapters.round_config(tmp_path)(40)
    assert config == TrainConfig(**{**asdict(trained), "iters": 40, "steps_per_eval": 40,
                                    "learning_rate": 2.5e-5, "warmup": 10, "save_every": 25})


def test_missing_rows_or_adapters_are_one_line_and_write_nothing(tmp_path):
    with pytest.raises(SystemExit) as e:
        harden_adapters.main(["--model", str(tmp_path), "--rows", str(tmp_path / "rows"),
                              "--adapters", str(tmp_path / "a"), "--out", str(tmp_path / "out")])
    assert str(e.value) == (f"Error: need {tmp_path}/rows/train.jsonl and "
                            f"{tmp_path}/a/{ADAPTER_CONFIG}.")
    assert not (tmp_path / "out").exists()
