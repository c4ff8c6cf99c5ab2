"""`dualedit train` options reach the method's config, its trainer and the train settings."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from dualedit.cli import _method_config, _train_settings, build_parser
from dualedit.editors.dualedit import DualEditConfig
from dualedit.editors.dualedit.calibrate import CALIBRATION_MODES, TauChoice
from dualedit.editors.dualedit.config import GATE_KEYS
from dualedit.train import TrainSettings

BASE = ["train", "--method", "dualedit", "--model", "m", "--data", "d", "--out", "o"]


def test_defaults_leave_the_library_defaults():
    args = build_parser().parse_args(BASE)
    assert _method_config(args) == {}
    assert _train_settings(args) == TrainSettings()


def test_options_and_a_config_file_reach_the_config(tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"text_layer": 3, "width": 64, "tau": 0.5}))
    args = build_parser().parse_args(
        [*BASE, "--config", str(config_file), "--option", "text_keys=all", "--option",
         "text_prompt_end=false", "--option", "gate_key=prompt_end_image", "--option",
         "tau=0.85", "--option", "text_layer=1", "--option", "visual_layer=2", "--lr", "0.002"]
    )
    config = _method_config(args)
    assert config == {
        "text_keys": "all",
        "text_prompt_end": False,
        "gate_key": "prompt_end_image",
        "tau": 0.85,  # --option over --config
        "text_layer": 1,
        "visual_layer": 2,
        "width": 64,
    }
    DualEditConfig(**config)  # valid
    assert _train_settings(args).lr == 0.002


def test_settings_file_then_flags(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"lr": 0.01, "max_steps": 50, "eval_every": 10}))
    args = build_parser().parse_args([*BASE, "--settings", str(path), "--steps", "70"])
    assert _train_settings(args) == TrainSettings(lr=0.01, max_steps=70, eval_every=10)
    args = build_parser().parse_args([*BASE, "--checkpoint-every", "25"])
    assert _train_settings(args) == TrainSettings(checkpoint_every=25)
    args = build_parser().parse_args([*BASE, "--checkpoint-every", "0"])
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 1"):
        _train_settings(args)


@pytest.mark.parametrize("kind", GATE_KEYS)
def test_every_gate_key_is_accepted(kind):
    args = build_parser().parse_args([*BASE, "--option", f"gate_key={kind}"])
    assert _method_config(args) == {"gate_key": kind}
    DualEditConfig(**_method_config(args))


def fake_training(monkeypatch):
    import dualedit.data.mmedit
    import dualedit.editors.dualedit.method
    import dualedit.evaluate

    seen = {}

    def fake_train(model, processor, dataset, **kwargs):
        seen.update(kwargs)
        choice = TauChoice(tau=0.9, accuracy=1.0, pass_rates={"t_gen": 1.0}, edits=4)
        return SimpleNamespace(steps=0, stop_reason="max_steps", best_score=0.0, best_step=0,
                               best_dir="o/best", finish=choice)

    monkeypatch.setattr(dualedit.evaluate, "load_vlm", lambda path: (None, None))
    monkeypatch.setattr(dualedit.data.mmedit, "load_split", lambda *a: [])
    monkeypatch.setattr(dualedit.editors.dualedit.method, "train_dualedit", fake_train)
    return seen


@pytest.mark.parametrize("mode", CALIBRATION_MODES)
def test_calibration_reaches_train_dualedit(mode, monkeypatch, capsys):
    seen = fake_training(monkeypatch)
    args = build_parser().parse_args([*BASE, "--train-option", f"calibration={mode}"])
    assert args.func(args) == 0
    assert seen["calibration"] == mode and seen["calibrate_tau"] is True
    assert "gate threshold tau 0.9000 chosen on 4 validation edits" in capsys.readouterr().out


def test_heads_size_reaches_train_dualedit(monkeypatch):
    seen = fake_training(monkeypatch)
    args = build_parser().parse_args([*BASE, "--option", "gate_key=learned", "--train-option",
                                      "heads_mlp=256"])
    assert args.func(args) == 0
    assert seen["heads_mlp"] == 256 and seen["config"] == {"gate_key": "learned"}


def test_a_given_tau_is_kept(monkeypatch):
    seen = fake_training(monkeypatch)
    args = build_parser().parse_args([*BASE, "--option", "tau=0.7"])
    assert args.func(args) == 0
    assert seen["calibrate_tau"] is False and seen["config"] == {"tau": 0.7}
    args = build_parser().parse_args([*BASE, "--option", "tau=0.7", "--train-option",
                                      "calibrate_tau=true"])
    assert args.func(args) == 0
    assert seen["calibrate_tau"] is True


def test_the_registry_trainer_is_what_the_cli_calls(monkeypatch):
    from dualedit.editors import METHODS

    calls = []
    spec = METHODS["dualedit"]

    def trainer(*args, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(steps=1, stop_reason="max_steps", best_score=1.0, best_step=1,
                               best_dir="o/best", finish=None)

    import dualedit.evaluate
    import dualedit.data.mmedit

    monkeypatch.setattr(dualedit.evaluate, "load_vlm", lambda path: (None, None))
    monkeypatch.setattr(dualedit.data.mmedit, "load_split", lambda *a: [])
    monkeypatch.setitem(METHODS, "dualedit", dataclasses.replace(spec, train=trainer))
    args = build_parser().parse_args(BASE)
    assert args.func(args) == 0
    assert calls and calls[0]["settings"] == TrainSettings() and calls[0]["resume"] is True
