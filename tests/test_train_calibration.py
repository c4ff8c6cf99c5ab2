"""Calibrating saved adapters on the validation edits: the same edits and tau as training's own
calibration, saved where asked (the source left as it was), another gate key, the CLI."""

from __future__ import annotations

import json

import pytest
from test_train_data import write_tiny_mmedit

from dualedit.cli import build_parser, main
from dualedit.data.mmedit import MMEditDataset
from dualedit.editors.dualedit import DualEditor, calibrate_adapters
from dualedit.editors.dualedit.calibrate import choose_tau
from dualedit.train import split_indices

CONFIG = {"text_layer": 2, "visual_layer": 3, "width": 16, "heads": 2}


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    return write_tiny_mmedit(tmp_path_factory.mktemp("tiny_mmedit"), n=8)


def saved_config(folder):
    return json.loads((folder / "adapter_config.json").read_text())["config"]


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_calibrate_adapters_saves_a_calibrated_copy(tiny_factory, tiny_train, tmp_path, mode):
    model, processor = tiny_factory("llava")
    editor = DualEditor(model, processor, tau=0.5, **CONFIG)
    editor.save_pretrained(tmp_path / "src")
    editor.detach()
    before = (tmp_path / "src" / "adapter_config.json").read_bytes()
    choice = calibrate_adapters(
        model, processor, tmp_path / "src", tiny_train, out_dir=tmp_path / "out", val_edits=3,
        mode=mode, gate_key="prompt_end_and_image",
    )
    assert (tmp_path / "src" / "adapter_config.json").read_bytes() == before  # untouched
    out = saved_config(tmp_path / "out")
    assert out["tau"] == choice.tau and out["gate_key"] == "prompt_end_and_image"
    assert choice.mode == mode and choice.edits == 3
    # The edits are those training holds out, and the tau is choose_tau's on them.
    check = DualEditor.from_pretrained(model, processor, tmp_path / "src",
                                       gate_key="prompt_end_and_image")
    try:
        expected = choose_tau(check, tiny_train, split_indices(len(tiny_train), 3)[1], mode=mode)
    finally:
        check.detach()
    assert expected == choice


def test_calibrate_adapters_for_a_fuller_memory_stores_distractors(tiny_factory, tiny_train,
                                                                   tmp_path):
    from dualedit.editors.dualedit.calibrate import distractor_indices

    model, processor = tiny_factory("llava")
    editor = DualEditor(model, processor, tau=0.5, **CONFIG)
    editor.save_pretrained(tmp_path / "src")
    editor.detach()
    choice = calibrate_adapters(model, processor, tmp_path / "src", tiny_train,
                                out_dir=tmp_path / "out", val_edits=3, mode="sequential",
                                stored=7)
    assert choice.edits == 3 and choice.stored == 7
    assert saved_config(tmp_path / "out")["tau"] == choice.tau
    val = split_indices(len(tiny_train), 3)[1]
    check = DualEditor.from_pretrained(model, processor, tmp_path / "src")
    try:
        expected = choose_tau(check, tiny_train, val, mode="sequential",
                              distractors=distractor_indices(len(tiny_train), val, 7,
                                                             "sequential"))
    finally:
        check.detach()
    assert expected == choice
    with pytest.raises(ValueError, match="mode=sequential"):
        calibrate_adapters(model, processor, tmp_path / "src", tiny_train, val_edits=3,
                           stored=7)
    with pytest.raises(ValueError, match="calibration option stored"):
        calibrate_adapters(model, processor, tmp_path / "src", tiny_train, val_edits=3,
                           mode="sequential", stored=9)


def test_calibrate_adapters_refuses_the_eval_split_and_bad_modes(tiny_factory, tiny_train,
                                                                 tmp_path):
    model, processor = tiny_factory("llava")
    eval_file = tiny_train.path.parent / "vqa_eval.json"
    eval_file.write_text(tiny_train.path.read_text())
    with pytest.raises(ValueError, match="the eval split"):
        calibrate_adapters(model, processor, tmp_path,
                           MMEditDataset(eval_file, tiny_train.images.root))
    with pytest.raises(ValueError, match="calibration mode must be one of"):
        calibrate_adapters(model, processor, tmp_path, tiny_train, mode="together")


def test_cli_calibrate_passes_its_options(monkeypatch, capsys, tmp_path):
    import dataclasses

    import dualedit.data.mmedit
    import dualedit.evaluate
    from dualedit.editors import METHODS
    from dualedit.editors.dualedit.calibrate import TauChoice

    seen = {}

    def fake(model, processor, editor, dataset, **kwargs):
        seen.update(kwargs, editor=editor, dataset=dataset)
        return TauChoice(tau=0.9, edits=64, mode=kwargs["mode"], accuracy=1.0,
                         pass_rates={"t_gen": 1.0})

    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"format": 2, "method": "dualedit", "config": {}, "model_type": "llava",
         "hidden_size": 8, "depth": 2}
    ))
    monkeypatch.setattr(dualedit.evaluate, "load_vlm", lambda path: (None, None))
    monkeypatch.setattr(dualedit.data.mmedit, "load_split", lambda *a: a)
    monkeypatch.setitem(METHODS, "dualedit", dataclasses.replace(METHODS["dualedit"], calibrate=fake))
    args = build_parser().parse_args(
        ["calibrate", "--model", "m", "--editor", str(folder), "--data", "d", "--out", "o",
         "--option", "mode=sequential", "--option", "gate_key=prompt_end_and_image",
         "--option", "stored=1000", "--val-edits", "5"]
    )
    assert args.func(args) == 0
    assert seen["mode"] == "sequential" and seen["gate_key"] == "prompt_end_and_image"
    assert seen["val_edits"] == 5 and str(seen["out_dir"]) == "o" and seen["stored"] == 1000
    assert str(seen["editor"]) == str(folder)
    assert seen["dataset"][1:] == ("vqa", "train")  # never the eval split
    assert "tau 0.9000" in capsys.readouterr().out
    # A folder of a method without a calibration step is refused with its name.
    (folder / "adapter_config.json").write_text(json.dumps(
        {"format": 2, "method": "ft-l", "config": {}, "model_type": "llava", "hidden_size": 8,
         "depth": 2}
    ))
    assert main(["-q", "calibrate", "--model", "m", "--editor", str(folder), "--data", "d"]) == 2
    assert "'ft-l'" in capsys.readouterr().err
