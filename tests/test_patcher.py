"""Transformer-Patcher: one neuron per edit in the last FFN, silent on unrelated inputs, removable
one by one, never writing the model's weights."""

from __future__ import annotations

import pytest
import torch
from test_train_data import write_tiny_mmedit

from dualedit.data.prompts import encode
from dualedit.data.requests import EditRequest
from dualedit.editors import make_editor

REQUESTS = [
    EditRequest("red.png", "what color is the ball? the answer is:", "blue"),
    EditRequest("blue.png", "what shape is the kite? the answer is:", "star"),
]


@pytest.mark.parametrize("arch", ["llava", "blip2"])
def test_a_neuron_per_edit_fits_it_stays_silent_elsewhere_and_is_removable(
    arch, tiny_factory, tiny_images, tmp_path
):
    write_tiny_mmedit(tmp_path, n=12)
    model, processor = tiny_factory(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = make_editor(
        "tp", model, processor, memory_data=str(tmp_path), memory_size=8, steps=40
    )
    try:
        batch = encode([r.sample() for r in REQUESTS], processor, editor.backbone, tiny_images)
        mask = batch.target_mask
        with torch.no_grad():
            base = editor.logits(batch)
        first = editor.apply(REQUESTS[:1], tiny_images)
        editor.apply(REQUESTS[1:], tiny_images)
        assert len(editor.store) == 2 and editor.state_tensors()["key"].shape[0] == 2
        with torch.no_grad():
            edited = editor.logits(batch)
        for row in range(2):  # each edit is fitted
            assert torch.equal(edited[row][mask[row]].argmax(-1), batch.target_ids[row][mask[row]])
        # The neurons stay below the memory margin on most unrelated inputs they were trained on.
        memory = editor._memory(edited.device)
        keys = editor.store.stacked("key").float()
        biases = editor.store.stacked("bias").float().squeeze(-1)
        silent = (memory @ keys.T + biases <= editor.config.memory_margin + 1e-3).float().mean()
        assert silent > 0.9
        # The weights are never written; removing both neurons gives the unedited logits back.
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        editor.remove(first[0])
        assert [e.target for e in editor.edits()] == ["star"]
        editor.restore()
        with torch.no_grad():
            assert torch.equal(editor.logits(batch), base)
    finally:
        editor.detach()


def test_options_are_checked(tiny_llava):
    model, processor = tiny_llava
    with pytest.raises(ValueError, match="tp option memory_task"):
        make_editor("tp", model, processor, memory_task="images")
    with pytest.raises(ValueError, match="tp option steps"):
        make_editor("tp", model, processor, steps=0)


def test_eval_gives_tp_the_evaluated_data_folder_as_its_memory():
    """`dualedit eval`, bench and the demo fill the method's train-data options with the data
    folder and task they evaluate, unless the user gave them."""
    from dualedit.editors import METHODS

    spec = METHODS["tp"]
    assert spec.with_train_data(None, "/w", "caption") == {
        "memory_data": "/w", "memory_task": "caption"}
    assert spec.with_train_data({"memory_data": "/other"}, "/w", "vqa") == {
        "memory_data": "/other", "memory_task": "vqa"}
    assert METHODS["ft-l"].with_train_data({"steps": 3}, "/w", "vqa") == {"steps": 3}
