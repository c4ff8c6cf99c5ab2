"""The trained baselines (MEND, KE, SERAC, LTE) as a user runs them: `dualedit train --method M`
on a saved model folder and an MMEdit folder, then `dualedit eval --editor best/` on it; both
tiny backbones, two training steps."""

from __future__ import annotations

import json

import pytest
from test_train_data import write_tiny_mmedit

from dualedit.cli import main

#: Small configs, so that two steps on the tiny models stay fast.
OPTIONS = {
    "mend": ["rank=16"],
    "ke": ["condition_width=16", "hidden=8", "lstm_width=8"],
    "serac": ["scope_width=16", "counterfactual_layers=1"],
    "lte": ["lora_r=2"],
}


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_train_then_eval_from_the_command_line(method, tiny_vlm, tiny_factory, tmp_path):
    model, processor = tiny_factory(tiny_vlm.name)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data = tmp_path / "data"
    dataset = write_tiny_mmedit(data, n=8)
    (data / "vqa" / "vqa_eval.json").write_text(dataset.path.read_text())  # a scored split
    run = tmp_path / "run"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"val_edits": 2, "checkpoint_every": 2}))
    options = [arg for option in OPTIONS[method] for arg in ("--option", option)]
    code = main([
        "-q", "train", "--method", method, "--model", str(model_dir), "--data", str(data),
        "--task", "vqa", "--out", str(run), "--steps", "2", "--batch-size", "2",
        "--eval-every", "2", "--settings", str(settings), *options,
    ])
    assert code == 0
    saved = json.loads((run / "best" / "adapter_config.json").read_text())
    assert saved["method"] == method
    out = tmp_path / "eval"
    code = main([
        "-q", "eval", "--editor", str(run / "best"), "--model", str(model_dir), "--data",
        str(data), "--task", "vqa", "--limit", "2", "--no-generation", "--out", str(out),
    ])
    assert code == 0
    results = json.loads(next(out.rglob("results.json")).read_text())
    assert results["method"] == method
    means = results["runs"][0]["means"]
    assert all(0.0 <= means[key] <= 100.0 for key in ("rel", "t_gen", "v_gen", "t_loc", "m_loc"))
