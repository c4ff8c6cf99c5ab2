"""Saved editors, memories and training runs are complete and self-checking: damaged, hand-edited
or incomplete files are refused naming the file; an editor loads only onto its base model; a
second writer gets an error instead of losing an edit; a second training run on one folder is
refused; a run killed during its finish step leaves no unfinished best/; a damaged checkpoint is
refused on resume and left as it was. (Folder mechanics, kills and two processes: test_folders.py.)
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from folder_tools import rewrite_json, rewrite_tensors
from test_train_trainable import BiasTrainable, run, tiny_train  # noqa: F401  (a fixture)

from dualedit.cli import _one_line, main
from dualedit.editors import load_editor, make_editor
from dualedit.editors.dualedit import DualEditor
from dualedit.fingerprint import base_fingerprint, fingerprint_mismatch
from dualedit.folders import ConcurrentChange, FolderLocked, folder_lock
from dualedit.train.checkpoint import checkpoint_dir

EDITS = [
    ("red.png", "What color is the ball? The answer is:", "blue"),
    ("green.png", "What color is the ball? The answer is:", "red"),
]


def flip_byte(path: Path, at: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def saved_dualedit(tiny_llava, tiny_images, tmp_path):
    """A DualEdit folder on the tiny LLaVA holding two edits."""
    model, processor = tiny_llava
    editor = DualEditor(model, processor, tau=0.5, heads=4)
    try:
        for image, prompt, target in EDITS:
            editor.edit(tiny_images(image), prompt, target)
        editor.save_pretrained(tmp_path / "ed")
    finally:
        editor.detach()
    return tmp_path / "ed"


def test_the_fingerprint_ignores_dtype_and_catches_other_weights(tiny_llava, tiny_factory):
    model, _ = tiny_llava
    now = base_fingerprint(model)
    assert fingerprint_mismatch(now, base_fingerprint(copy.deepcopy(model).to(torch.bfloat16))) is None
    other, _ = tiny_factory("llava", seed=1)
    assert "parameters have other values" in fingerprint_mismatch(now, base_fingerprint(other))
    blip2, _ = tiny_factory("blip2")
    assert "names or shapes differ" in fingerprint_mismatch(now, base_fingerprint(blip2))
    assert "unreadable" in fingerprint_mismatch({"version": 99}, now)


@pytest.mark.parametrize("method", ["dualedit", "ft-l"])
def test_an_editor_loads_only_onto_its_base_model(method, tiny_llava, tiny_factory, tmp_path):
    model, processor = tiny_llava
    editor = make_editor(method, model, processor)
    editor.save_pretrained(tmp_path / "ed")
    editor.detach()
    meta = json.loads((tmp_path / "ed" / "adapter_config.json").read_text())
    assert meta["base_fingerprint"]["structure"] == base_fingerprint(model)["structure"]
    other, other_processor = tiny_factory("llava", seed=1)
    with pytest.raises(ValueError, match="saved for other base weights.*--ignore-base-mismatch"):
        load_editor(other, other_processor, tmp_path / "ed")
    loaded = load_editor(other, other_processor, tmp_path / "ed", ignore_base_mismatch=True)
    loaded.detach()
    load_editor(model, processor, tmp_path / "ed").detach()


def _nan_adapter(tensors):
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))


def _int_adapter(tensors):
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(torch.int64)


def _swap_text_lengths(index):
    # Rows moved from edit 1's text states to edit 0's, past edit 0's visual count (a shift that
    # keeps within the visual counts cannot be told from the lengths alone under text_keys
    # "answer", where the gap is each prompt's length).
    moved = index["visual_lengths"][0] + 1 - index["text_lengths"][0]
    index["text_lengths"] = [index["text_lengths"][0] + moved, index["text_lengths"][1] - moved]


DAMAGES = {
    "flipped adapter byte": (
        lambda d: flip_byte(d / "adapter_model.safetensors"),
        "adapter_model.safetensors: damaged",
    ),
    "truncated memory": (
        lambda d: (d / "memory.safetensors").write_bytes((d / "memory.safetensors").read_bytes()[:100]),
        "memory.safetensors: damaged",
    ),
    "tau removed by hand": (
        lambda d: (d / "adapter_config.json").write_text(
            json.dumps({k: v if k != "config" else {**v, "tau": None} for k, v in
                        json.loads((d / "adapter_config.json").read_text()).items()})
        ),
        "adapter_config.json: damaged or edited by hand",
    ),
    "config truncated": (
        lambda d: (d / "adapter_config.json").write_text((d / "adapter_config.json").read_text()[:50]),
        "adapter_config.json: not valid JSON",
    ),
    "tau removed, re-signed": (
        lambda d: rewrite_json(d / "adapter_config.json", lambda m: m["config"].pop("tau")),
        "config lacks field\\(s\\) \\['tau'\\]",
    ),
    "layer removed, re-signed": (
        lambda d: rewrite_json(d / "adapter_config.json", lambda m: m["config"].pop("visual_layer")),
        "config lacks field\\(s\\) \\['visual_layer'\\]",
    ),
    "top-level field removed, re-signed": (
        lambda d: rewrite_json(d / "adapter_config.json", lambda m: m.pop("config")),
        "missing field\\(s\\) \\['config'\\]",
    ),
    "NaN adapter, re-signed": (
        lambda d: rewrite_tensors(d / "adapter_model.safetensors", _nan_adapter,
                                  manifest="adapter_config.json"),
        "holds .* NaN",
    ),
    "integer adapter, re-signed": (
        lambda d: rewrite_tensors(d / "adapter_model.safetensors", _int_adapter,
                                  manifest="adapter_config.json"),
        "not floating point",
    ),
    "memory lengths swapped, re-signed": (
        lambda d: rewrite_json(d / "memory.json", _swap_text_lengths, manifest="adapter_config.json"),
        "memory.json: edit [01] keeps .* the index is damaged",
    ),
    "null id, re-signed": (
        lambda d: rewrite_json(d / "memory.json", lambda m: m["ids"].__setitem__(0, None),
                               manifest="adapter_config.json"),
        "memory.json: edit id must be an int or a str",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_editor_folders_are_refused_naming_the_file(damage, saved_dualedit, tiny_llava):
    model, processor = tiny_llava
    change, message = DAMAGES[damage]
    load_editor(model, processor, saved_dualedit).detach()  # whole, it loads
    change(saved_dualedit)
    with pytest.raises(ValueError, match=message) as error:
        load_editor(model, processor, saved_dualedit)
    assert str(saved_dualedit) in str(error.value)
    # Nothing was left attached by the refused load.
    assert not any(layer._forward_hooks for layer in model.model.language_model.layers)


def test_load_add_save_by_two_editors_loses_no_edit(saved_dualedit, tiny_llava, tiny_images):
    model, processor = tiny_llava
    first = load_editor(model, processor, saved_dualedit)
    first.detach()
    second = load_editor(model, processor, saved_dualedit)
    second.detach()
    first.attach()
    first.edit(tiny_images("blue.png"), "What color is the ball? The answer is:", "green")
    first.save_pretrained(saved_dualedit)
    first.detach()
    second.attach()
    second.edit(tiny_images("red.png"), "What shape is it? The answer is:", "ball")
    with pytest.raises(ConcurrentChange, match="saved by another process after this one loaded it"):
        second.save_pretrained(second_folder := saved_dualedit)
    second.detach()
    again = load_editor(model, processor, second_folder)
    try:
        assert [e.target for e in again.edits()] == ["blue", "red", "green"]
        again.edit(tiny_images("red.png"), "What shape is it? The answer is:", "ball")
        again.save_pretrained(saved_dualedit)  # loaded after the other save: accepted
    finally:
        again.detach()
    assert len(json.loads((saved_dualedit / "memory.json").read_text())["ids"]) == 4


def test_unknown_target_words_are_applied_with_a_warning(tiny_llava, tiny_images, caplog):
    model, processor = tiny_llava
    editor = DualEditor(model, processor, tau=0.5, heads=4)
    try:
        with caplog.at_level(logging.WARNING, logger="dualedit.editors.base"):
            editor.edit(tiny_images("red.png"), EDITS[0][1], "blue")
            assert "does not know" not in caplog.text
            editor.edit(tiny_images("red.png"), EDITS[0][1], "zyxwv")
        assert "'zyxwv' has 1 token(s) the tokenizer does not know" in caplog.text
    finally:
        editor.detach()


# -- training runs ------------------------------------------------------------------------------


class FailingFinish(BiasTrainable):
    """Killed during its finish step (as by kill -9 or Ctrl-C during DualEdit's tau)."""

    def finish(self, best_dir, dataset, val_idx):
        raise KeyboardInterrupt


def test_a_run_killed_in_its_finish_step_leaves_no_unfinished_best(tiny_factory, tiny_train, tmp_path):
    model, processor = tiny_factory("llava")
    with pytest.raises(KeyboardInterrupt):
        run(FailingFinish, model, processor, tiny_train, tmp_path / "run")
    assert not (tmp_path / "run" / "best").exists()
    assert (checkpoint_dir(tmp_path / "run") / "best").is_dir()
    trainable, result = run(BiasTrainable, model, processor, tiny_train, tmp_path / "run")
    assert trainable.finished and result.best_dir == tmp_path / "run" / "best"
    assert (result.best_dir / "bias.safetensors").is_file()
    assert not (tmp_path / "run" / ".best.finishing").exists()  # no finishing copy left


def test_a_second_run_on_one_out_dir_is_refused(tiny_factory, tiny_train, tmp_path):
    model, processor = tiny_factory("llava")
    with folder_lock(tmp_path / "run"):  # another run holds it
        with pytest.raises(FolderLocked, match="run.*another process is writing this training"):
            run(BiasTrainable, model, processor, tiny_train, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_a_damaged_checkpoint_is_refused_on_resume_and_kept(tiny_factory, tiny_train, tmp_path):
    model, processor = tiny_factory("llava")
    run(BiasTrainable, model, processor, tiny_train, tmp_path / "run", max_steps=3)
    tensors = checkpoint_dir(tmp_path / "run") / "state.safetensors"
    flip_byte(tensors)
    damaged = tensors.read_bytes()
    with pytest.raises(ValueError, match="state.safetensors: damaged"):
        run(BiasTrainable, model, processor, tiny_train, tmp_path / "run", max_steps=6)
    assert tensors.read_bytes() == damaged  # not replaced by a run trained from it
    rewrite_json(checkpoint_dir(tmp_path / "run") / "state.json", lambda r: r.pop("rng"))
    with pytest.raises(ValueError, match="missing field\\(s\\) \\['rng'\\]"):
        run(BiasTrainable, model, processor, tiny_train, tmp_path / "run", max_steps=6)


class Diverging(BiasTrainable):
    def loss(self, batch):
        loss, terms = super().loss(batch)
        return loss * float("nan"), terms


def test_a_diverged_run_keeps_its_last_good_checkpoint(tiny_factory, tiny_train, tmp_path):
    model, processor = tiny_factory("llava")
    run(BiasTrainable, model, processor, tiny_train, tmp_path / "run", max_steps=3)
    state = checkpoint_dir(tmp_path / "run") / "state.json"
    good = state.read_bytes()
    with pytest.raises(ValueError, match="NaN or infinite .* the run diverged"):
        run(Diverging, model, processor, tiny_train, tmp_path / "run", max_steps=6)
    assert state.read_bytes() == good


# -- the CLI -------------------------------------------------------------------------------------


def test_cli_prints_file_errors_in_one_line_and_exits_2(saved_dualedit, capsys):
    flip_byte(saved_dualedit / "adapter_config.json", at=10)
    code = main(["calibrate", "--model", "m", "--editor", str(saved_dualedit), "--data", "d"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("dualedit: error: ") and "adapter_config.json" in err
    assert _one_line(PermissionError(13, "Permission denied", "/x/y")) == (
        "[Errno 13] Permission denied: '/x/y'"
    )
    assert _one_line(ValueError("two\nlines")) == "two lines"


def test_eval_split_val_is_the_validation_edits_of_the_train_split(tmp_path):
    """`--split val` scores exactly the records training holds out (`split_indices`), never the
    eval split: for tuning an untrained method's options."""
    from test_train_data import write_tiny_mmedit

    from dualedit.evaluate import load_dataset_split
    from dualedit.train.data import split_indices
    from dualedit.train.settings import TrainSettings

    train = write_tiny_mmedit(tmp_path, n=80)
    val = load_dataset_split(tmp_path, "vqa", "val")
    _, held_out = split_indices(len(train), TrainSettings().val_edits)
    assert len(val) == TrainSettings().val_edits == len(held_out)
    assert list(val) == [train[i] for i in held_out]
    assert val.images is train.images or val.images.root == train.images.root
