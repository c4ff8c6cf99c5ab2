"""The learning-rate schedule of the training loop: constant, cosine or linear decay after the
warm-up, validated, part of a run's trajectory (with its step budget), reachable from the CLI."""

from __future__ import annotations

import json
import math

import pytest
from test_train_data import write_tiny_mmedit

from dualedit.cli import TRAIN_LR_SCHEDULES, _train_settings, build_parser
from dualedit.editors.dualedit import train_dualedit
from dualedit.train import TrainSettings
from dualedit.train.loop import _lr_at
from dualedit.train.settings import LR_SCHEDULES

BASE = ["train", "--method", "dualedit", "--model", "m", "--data", "d", "--out", "o"]
CONFIG = {"text_layer": 2, "visual_layer": 3, "width": 16, "heads": 2}


def test_rates_along_each_schedule():
    constant = TrainSettings(lr=0.1, max_steps=11, warmup_steps=1)
    cosine = TrainSettings(lr=0.1, max_steps=11, warmup_steps=1, lr_schedule="cosine")
    linear = TrainSettings(lr=0.1, max_steps=11, warmup_steps=1, lr_schedule="linear")
    for s in (constant, cosine, linear):
        assert _lr_at(s, 0) == pytest.approx(0.1)  # warm-up of one step ends at lr
        assert _lr_at(s, 1) == pytest.approx(0.1)  # the decay starts at lr
    assert [_lr_at(constant, k) for k in (5, 10, 50)] == [0.1, 0.1, 0.1]
    # Halfway (step 6 of the 10 after warm-up) and the end: 0 at max_steps, never below.
    assert _lr_at(cosine, 6) == pytest.approx(0.05)
    assert _lr_at(cosine, 3) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.2)))
    assert _lr_at(linear, 6) == pytest.approx(0.05)
    assert _lr_at(linear, 3) == pytest.approx(0.08)
    for s in (cosine, linear):
        assert _lr_at(s, 11) == pytest.approx(0.0) and _lr_at(s, 40) == pytest.approx(0.0)
        rates = [_lr_at(s, k) for k in range(1, 12)]
        assert rates == sorted(rates, reverse=True)  # never rises


def test_schedule_is_validated_and_kept_in_json(tmp_path):
    with pytest.raises(ValueError, match=r"lr_schedule must be one of \['constant', 'cosine'"):
        TrainSettings(lr_schedule="exponential")
    s = TrainSettings(lr_schedule="cosine", max_steps=30)
    path = tmp_path / "settings.json"
    path.write_text(s.to_json())
    assert TrainSettings.from_json(path) == s
    # Settings written before the field existed read as constant.
    assert TrainSettings.from_dict({"lr": 0.01}).lr_schedule == "constant"


def test_budget_is_part_of_a_decaying_trajectory():
    constant = TrainSettings(max_steps=10)
    assert constant.trajectory_changes(TrainSettings(max_steps=20)) == {}
    cosine = TrainSettings(max_steps=10, lr_schedule="cosine")
    assert cosine.trajectory_changes(TrainSettings(max_steps=20, lr_schedule="cosine")) == {
        "max_steps": (10, 20)
    }
    assert constant.trajectory_changes(cosine) == {"lr_schedule": ("constant", "cosine")}


def test_cli_flag_reaches_the_settings():
    assert TRAIN_LR_SCHEDULES == LR_SCHEDULES
    args = build_parser().parse_args([*BASE, "--lr-schedule", "linear", "--steps", "40"])
    assert _train_settings(args) == TrainSettings(lr_schedule="linear", max_steps=40)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--lr-schedule", "step"])


def test_the_loop_trains_along_the_schedule(tiny_factory, tmp_path):
    """The log's rates follow the cosine, and a resume with another budget is refused."""
    model, processor = tiny_factory("llava")
    data = write_tiny_mmedit(tmp_path / "data", n=10)
    settings = TrainSettings(
        lr=1e-2, batch_size=4, max_steps=4, eval_every=4, val_edits=2, log_every=1,
        checkpoint_every=2, patience=None, seed=1, lr_schedule="cosine",
    )
    out = tmp_path / "run"
    train_dualedit(model, processor, data, config=CONFIG, settings=settings, out_dir=out,
                   progress=False)
    entries = json.loads((out / "train_log.json").read_text())["entries"]
    rates = {e["step"]: e["lr"] for e in entries if e["kind"] == "train"}
    # Entry of step k holds the rate of the step that took the count to k (index k - 1).
    expected = {k: 1e-2 * 0.5 * (1 + math.cos(math.pi * (k - 1) / 4)) for k in range(1, 5)}
    assert rates == pytest.approx(expected)
    longer = TrainSettings(**{**settings.to_dict(), "max_steps": 8})
    with pytest.raises(ValueError, match=r"settings.max_steps: checkpoint 4, now 8"):
        train_dualedit(model, processor, data, config=CONFIG, settings=longer, out_dir=out,
                       progress=False)
