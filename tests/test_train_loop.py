"""`train_dualedit` on the tiny backbones: only the adapters train, the loss goes down, the best
adapters are saved and load, a resumed run ends exactly where an uninterrupted one does, early
stopping, settings and checkpoint checks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from folder_tools import rewrite_json
import torch
from safetensors.torch import load_file
from test_backbones_run_from import image_batch
from test_train_data import write_tiny_mmedit

from dualedit.backbones import get_backbone
from dualedit.data.mmedit import MMEditDataset
from dualedit.editors.dualedit import DualEditor, train_dualedit
from dualedit.train import TrainSettings, read_trained_seconds
from dualedit.train.checkpoint import (
    STATE_FILE,
    CheckpointMismatch,
    checkpoint_dir,
    weights_fingerprint,
)

CONFIG = {"text_layer": 2, "visual_layer": 3, "width": 16, "heads": 2}


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    return write_tiny_mmedit(tmp_path_factory.mktemp("tiny_mmedit"), n=10)


def settings(**changes):
    base = {
        "lr": 1e-2,
        "batch_size": 4,
        "max_steps": 6,
        "eval_every": 3,
        "val_edits": 2,
        "log_every": 1,
        "checkpoint_every": 3,
        "patience": None,
        "seed": 1,
    }
    return TrainSettings(**{**base, **changes})


def hook_counts(model, processor):
    """Forward and pre-forward hooks per module, after a plain forward (transformers installs
    its own output-capturing hooks on a first forward)."""
    backbone = get_backbone(model)
    batch = image_batch(SimpleNamespace(processor=processor, backbone=backbone))
    batch = batch.to(next(model.parameters()).device)
    with torch.no_grad():
        backbone.forward_logits(model, batch.input_ids, batch.attention_mask, batch.pixel_values)
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }


def weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_trains_adapters_only_and_keeps_the_best(tiny_factory, tiny_vlm, tiny_train, tmp_path):
    model, processor = tiny_factory(tiny_vlm.name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_counts(model, processor)
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    result = train_dualedit(
        model,
        processor,
        tiny_train,
        config=CONFIG,
        settings=settings(max_steps=16, eval_every=4, log_every=2),
        out_dir=tmp_path,
        progress=False,
    )
    # The base model: byte-identical weights, its requires_grad flags and train/eval mode back.
    # (Training moves it to accelerate's device, the GPU where there is one.)
    after = {k: v.cpu() for k, v in model.state_dict().items()}
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert hook_counts(model, processor) == hooks  # no hook of ours left behind
    assert result.steps == 16 and result.stop_reason == "max_steps"
    assert result.step_seconds is not None and result.step_seconds > 0

    log = json.loads(result.log_path.read_text())
    losses = [e["loss"] for e in log["entries"] if e["kind"] == "train"]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < losses[0] - 0.3  # observed drop ~0.5 on both backbones
    evals = [e for e in log["entries"] if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [4, 8, 12, 16]
    best = max(evals, key=lambda e: e["score"])  # first of the best (strict improvement)
    assert result.best_score == best["score"] and result.best_step == best["step"]
    for e in evals:
        assert e["score"] == pytest.approx(
            sum(e[k] for k in ("rel", "t_gen", "v_gen", "t_loc", "m_loc")) / 5
        )

    # The best adapters load with DualEditor.from_pretrained and are trained (not the identity).
    editor = DualEditor.from_pretrained(model, processor, result.best_dir)
    try:
        assert editor.config.text_layer == 2 and editor.config.gate  # saved as configured
        # tau chosen on the validation edits after training, and saved.
        assert result.tau is not None and result.tau.edits == 2
        assert editor.config.tau == result.tau.tau and 0.0 <= result.tau.accuracy <= 1.0
        trained = {k: v for k, v in editor.adapters.state_dict().items()}
        assert trained["text.out.weight"].abs().sum() > 0
        if result.best_step == result.steps:
            saved_last = weights(result.last_dir)
            assert all(torch.equal(trained[k], saved_last[k]) for k in saved_last)
    finally:
        editor.detach()
    assert all(torch.equal(before[k], v.cpu()) for k, v in model.state_dict().items())


def test_resume_ends_where_an_uninterrupted_run_ends(tiny_factory, tiny_vlm, tiny_train, tmp_path):
    def run(out_dir, max_steps, resume=True):
        model, processor = tiny_factory(tiny_vlm.name)
        return train_dualedit(
            model,
            processor,
            tiny_train,
            config=CONFIG,
            settings=settings(max_steps=max_steps),
            out_dir=out_dir,
            resume=resume,
            progress=False,
        )

    straight = run(tmp_path / "straight", 6)
    first = run(tmp_path / "resumed", 3)  # "killed" after its checkpoint at step 3
    assert first.steps == 3
    state = json.loads((checkpoint_dir(tmp_path / "resumed") / STATE_FILE).read_text())
    assert state["state"]["step"] == 3 and state["tensors"] == "state.safetensors"
    second = run(tmp_path / "resumed", 6)
    assert second.resumed_from == 3 and second.steps == 6
    for folder in ("last", "best"):
        a, b = weights(tmp_path / "straight" / folder), weights(tmp_path / "resumed" / folder)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), folder  # bit for bit
    assert second.best_score == straight.best_score and second.best_step == straight.best_step
    logs = [
        json.loads((tmp_path / d / "train_log.json").read_text()) for d in ("straight", "resumed")
    ]
    untimed = [
        [{k: v for k, v in e.items() if k != "elapsed_s"} for e in log["entries"]] for log in logs
    ]
    assert untimed[0] == untimed[1]
    # The wall time trained is carried over the kill: it keeps growing across the two calls.
    times = [e["elapsed_s"] for e in logs[1]["entries"]]
    assert all(t > 0 for t in times) and times == sorted(times)
    assert read_trained_seconds(tmp_path / "resumed") == times[-1]
    # A finished run resumed with the same budget does nothing more.
    again = run(tmp_path / "resumed", 6)
    assert again.resumed_from == 6 and again.steps == 6 and again.step_seconds is None
    # resume=False starts afresh.
    fresh = run(tmp_path / "resumed", 3, resume=False)
    assert fresh.resumed_from is None and fresh.steps == 3


def test_a_finished_run_asked_again_reuses_its_finish_unless_something_changed(
        tiny_factory, tiny_train, tmp_path, monkeypatch):
    """A cached run asked again trains no step and does not fit the gate heads and choose tau
    again: the recorded finish comes back as it was. Another calibration, a damaged record or
    more steps finish again."""
    from dualedit.editors.dualedit import train as train_module

    calls = []
    original = train_module.DualEditTrainable.finish

    def counted(self, *args, **kwargs):
        calls.append(self.calibration)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train_module.DualEditTrainable, "finish", counted)
    model, processor = tiny_factory("llava")

    def run(max_steps, **kwargs):
        return train_dualedit(model, processor, tiny_train, config=CONFIG,
                              settings=settings(max_steps=max_steps), out_dir=tmp_path / "run",
                              progress=False, **kwargs)

    first = run(4)
    assert calls == ["single"] and first.finish.mode == "single"
    config = (tmp_path / "run" / "best" / "adapter_config.json").read_bytes()
    again = run(4)
    assert calls == ["single"] and again.finish == first.finish and again.step_seconds is None
    assert (tmp_path / "run" / "best" / "adapter_config.json").read_bytes() == config
    # best/ changed since its finish (e.g. `dualedit calibrate` in place): finished again.
    rewrite_json(tmp_path / "run" / "best" / "adapter_config.json",
                 lambda meta: meta["config"].update(tau=0.123))
    run(4)
    assert calls == ["single", "single"]
    saved = json.loads((tmp_path / "run" / "best" / "adapter_config.json").read_text())
    assert saved["config"]["tau"] == first.finish.tau
    other = run(4, calibration="sequential")
    assert calls == ["single", "single", "sequential"] and other.finish.mode == "sequential"
    (tmp_path / "run" / "finish.json").write_text("{not json")
    run(4, calibration="sequential")
    assert calls == ["single", "single", "sequential", "sequential"]
    longer = run(6, calibration="sequential")
    assert calls[-1] == "sequential" and len(calls) == 5 and longer.steps == 6


def test_early_stopping_with_patience(tiny_factory, tiny_train, tmp_path):
    model, processor = tiny_factory("llava")
    # An improvement must exceed 1000 points: only the first validation counts as one.
    result = train_dualedit(
        model,
        processor,
        tiny_train,
        config=CONFIG,
        settings=settings(max_steps=50, eval_every=2, patience=2, min_delta=1000.0),
        out_dir=tmp_path,
        progress=True,
    )
    assert result.stop_reason == "early_stopping"
    assert result.steps == 6 and result.best_step == 2
    resumed = train_dualedit(
        model,
        processor,
        tiny_train,
        config=CONFIG,
        settings=settings(max_steps=50, eval_every=2, patience=2, min_delta=1000.0),
        out_dir=tmp_path,
        progress=False,
    )
    assert resumed.steps == 6 and resumed.stop_reason == "early_stopping"


def test_checkpoint_of_another_run_is_refused(tiny_factory, tiny_train, tmp_path):
    model, processor = tiny_factory("blip2")

    def run(base=model, config=CONFIG, **overrides):
        return train_dualedit(
            base,
            processor,
            tiny_train,
            config=config,
            settings=settings(**overrides),
            out_dir=tmp_path,
            progress=False,
        )

    run(max_steps=3)
    with pytest.raises(ValueError, match=r"settings.lr: checkpoint 0.01, now 0.02"):
        run(lr=2e-2)
    with pytest.raises(ValueError, match="config: checkpoint"):
        run(config={**CONFIG, "width": 8})
    # Budget and checkpoint frequency may change between a run and its resume.
    more = run(max_steps=4, checkpoint_every=1)
    assert more.resumed_from == 3 and more.steps == 4
    # The same path and settings, other base weights (a model trained again under the same
    # folder): refused, and so is a checkpoint that predates the fingerprint.
    other, _ = tiny_factory("blip2", seed=1)
    with pytest.raises(CheckpointMismatch, match="base model weights"):
        run(base=other, max_steps=5)
    meta_path = checkpoint_dir(tmp_path) / STATE_FILE
    assert len(json.loads(meta_path.read_text())["meta"]["base_weights"]) == 16
    rewrite_json(meta_path, lambda record: record["meta"].pop("base_weights"))
    with pytest.raises(CheckpointMismatch, match="base model weights: checkpoint None"):
        run(max_steps=5)


def test_weights_fingerprint_follows_every_parameter(tiny_factory):
    model, _ = tiny_factory("llava")
    before = weights_fingerprint(model)
    assert before == weights_fingerprint(model) and len(before) == 16
    last = list(model.parameters())[-1]
    with torch.no_grad():
        last.view(-1)[0] += 1e-3
    assert weights_fingerprint(model) != before


def test_user_errors(tiny_factory, tiny_train, tmp_path):
    model, processor = tiny_factory("llava")
    with pytest.raises(ValueError, match="8 training edits are fewer than batch_size 12"):
        train_dualedit(
            model,
            processor,
            tiny_train,
            config=CONFIG,
            settings=settings(batch_size=12),
            out_dir=tmp_path,
            progress=False,
        )
    with pytest.raises(ValueError, match="unknown DualEditConfig field"):
        train_dualedit(
            model,
            processor,
            tiny_train,
            config={"text_layr": 2},
            settings=settings(),
            out_dir=tmp_path,
            progress=False,
        )
    with pytest.raises(ValueError, match="val_fraction must be in"):
        train_dualedit(
            model,
            processor,
            tiny_train,
            config=CONFIG,
            settings=settings(),
            out_dir=tmp_path,
            val_fraction=1.5,
            progress=False,
        )
    with pytest.raises(ValueError, match="calibration must be one of"):
        train_dualedit(
            model,
            processor,
            tiny_train,
            config=CONFIG,
            settings=settings(),
            out_dir=tmp_path / "refused",
            calibration="together",
            progress=False,
        )
    assert not (tmp_path / "refused").exists()  # refused before any training
    eval_file = tiny_train.path.parent / "vqa_eval.json"
    eval_file.write_text(tiny_train.path.read_text())
    with pytest.raises(ValueError, match="vqa_eval.json: the eval split"):
        train_dualedit(
            model,
            processor,
            MMEditDataset(eval_file, tiny_train.images.root),
            config=CONFIG,
            settings=settings(),
            out_dir=tmp_path,
            progress=False,
        )
    assert not any(p.requires_grad is False for p in model.parameters())  # nothing left frozen


def test_settings_validation_and_json(tmp_path):
    s = TrainSettings(lr=3e-4, batch_size=8, patience=None, grad_clip=None)
    path = tmp_path / "settings.json"
    path.write_text(s.to_json())
    assert TrainSettings.from_json(path) == s
    assert json.loads(s.to_json())["batch_size"] == 8
    with pytest.raises(ValueError, match="unknown TrainSettings field"):
        TrainSettings.from_dict({"learning_rate": 1e-4})
    for bad in (
        {"lr": 0},
        {"batch_size": 0},
        {"patience": 0},
        {"grad_clip": -1.0},
        {"text_loc_kl": 1},
        {"max_steps": 2.5},
        {"min_delta": -1},
    ):
        with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
            TrainSettings(**bad)
    assert (
        s.trajectory_changes(
            TrainSettings(lr=3e-4, batch_size=8, patience=None, grad_clip=None, max_steps=9)
        )
        == {}
    )
    assert s.trajectory_changes(TrainSettings()).keys() >= {"lr", "batch_size"}


def test_data_workers_give_the_same_run(tiny_factory, tiny_train, tmp_path):
    """Batches encoded in a DataLoader worker process are those of the main process."""
    results = {}
    for workers in (0, 1):
        model, processor = tiny_factory("llava")
        train_dualedit(
            model,
            processor,
            tiny_train,
            config=CONFIG,
            settings=settings(max_steps=3, num_workers=workers),
            out_dir=tmp_path / str(workers),
            progress=False,
        )
        results[workers] = weights(tmp_path / str(workers) / "last")
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
