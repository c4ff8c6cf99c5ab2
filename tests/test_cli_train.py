"""`dualedit train` options reach the adapter config and the train settings."""

from __future__ import annotations

from dualedit.cli import _adapter_config, _train_settings, build_parser
from dualedit.editors.dualedit import DualEditConfig
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
