"""`dualedit train` options reach the adapter config and the train settings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dualedit.cli import _adapter_config, _train_settings, build_parser
from dualedit.editors.dualedit import DualEditConfig
from dualedit.editors.dualedit.calibrate import CALIBRATION_MODES
from dualedit.editors.dualedit.config import GATE_KEYS
from dualedit.train import TrainSettings

BASE = ["train", "--model", "m", "--data", "d", "--out", "o"]


def test_defaults_leave_the_library_defaults():
    args = build_parser().parse_args(BASE)
    assert _adapter_config(args) == {}
    assert _train_settings(args) == TrainSettings()


def test_new_adapter_options():
    args = build_parser().parse_args(
        [*BASE, "--text-keys", "all", "--released-text-positions", "--gate-key",
         "prompt_end_image", "--tau", "0.85", "--text-layer", "1", "--visual-layer", "2",
         "--lr", "0.002"]
    )
    config = _adapter_config(args)
    assert config == {
        "text_keys": "all",
        "text_prompt_end": False,
        "gate_key": "prompt_end_image",
        "tau": 0.85,
        "text_layer": 1,
        "visual_layer": 2,
    }
    DualEditConfig(**config)  # valid
    assert _train_settings(args).lr == 0.002


@pytest.mark.parametrize("kind", GATE_KEYS)
def test_every_gate_key_is_accepted(kind):
    args = build_parser().parse_args([*BASE, "--gate-key", kind])
    assert _adapter_config(args) == {"gate_key": kind}


@pytest.mark.parametrize("mode", CALIBRATION_MODES)
def test_calibration_reaches_train_dualedit(mode, monkeypatch, capsys):
    import dualedit.data.mmedit
    import dualedit.evaluate
    import dualedit.train

    seen = {}

    def fake_train(model, processor, dataset, **kwargs):
        seen.update(kwargs)
        return SimpleNamespace(steps=0, stop_reason="max_steps", best_score=0.0, best_step=0,
                               best_dir="o/best", tau=None)

    monkeypatch.setattr(dualedit.evaluate, "load_vlm", lambda path: (None, None))
    monkeypatch.setattr(dualedit.data.mmedit, "load_split", lambda *a: [])
    monkeypatch.setattr(dualedit.train, "train_dualedit", fake_train)
    args = build_parser().parse_args([*BASE, "--calibration", mode])
    assert args.func(args) == 0
    assert seen["calibration"] == mode and seen["calibrate_tau"] is True
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--calibration", "together"])
