"""VisEdit: one visual adapter on one layer with its influence map, no gate, trained by the
shared loop; DualEdit's machinery for the rest."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_data import write_tiny_mmedit

from dualedit.data.prompts import encode
from dualedit.data.requests import EditRequest
from dualedit.editors import load_editor, make_editor
from dualedit.editors.dualedit.adapter import CrossAttentionAdapter
from dualedit.editors.registry import get_method
from dualedit.editors.visedit import InfluenceAdapter, VisEditConfig, VisEditor
from dualedit.train import TrainSettings

REQUEST = EditRequest("red.png", "what color is the ball? the answer is:", "blue")


def test_config_is_one_visual_layer_without_gate():
    for bad in ({"gate": True}, {"use_text": True}, {"text_layer": 1, "visual_layer": 2},
                {"influence": 1}, {"influence_width": 0}):
        with pytest.raises(ValueError, match="VisEditConfig"):
            VisEditConfig(**bad)
    llava = VisEditConfig().resolve(32, 4096, "llava")
    blip2 = VisEditConfig().resolve(32, 2560, "blip-2")
    # The release's layers (18 of LLaVA-1.5-7B's 32, 19 of BLIP2-OPT-2.7B's), width 1024.
    assert (llava.visual_layer, llava.text_layer, llava.width) == (18, 18, 1024)
    assert (blip2.visual_layer, blip2.text_layer, blip2.influence_width) == (19, 19, 1024)
    assert not llava.gate and not llava.use_text and llava.influence
    assert "influence" in VisEditConfig.architecture


def test_the_influence_map_scales_the_update_per_image_position():
    torch.manual_seed(0)
    mapped = InfluenceAdapter(16, 8, 2, influence=True)
    plain = CrossAttentionAdapter(16, 8, 2)
    for adapter in (mapped, plain):  # a trained-looking output projection
        torch.nn.init.normal_(adapter.out.weight)
    plain.load_state_dict({k: v for k, v in mapped.state_dict().items() if "influence" not in k})
    h, h_edit = torch.randn(3, 5, 16), torch.randn(2, 4, 16)
    mask = torch.ones(2, 4, dtype=torch.bool)
    rows, anchor = torch.tensor([0, 1, 1]), torch.randn(2, 16)
    weight = mapped.influence(h, anchor.index_select(0, rows))  # [3, 5]
    assert weight.shape == (3, 5) and bool(((weight > 0) & (weight < 1)).all())
    assert weight.std() > 0  # positions differ
    got = mapped.delta(h, h_edit, mask, rows, anchor=anchor)
    torch.testing.assert_close(got, plain.delta(h, h_edit, mask, rows) * weight[..., None])
    with pytest.raises(ValueError, match="last prompt-token state"):
        mapped.delta(h, h_edit, mask, rows)
    fresh = InfluenceAdapter(16, 8, 2)
    assert torch.equal(fresh.delta(h, h_edit, mask, rows, anchor=anchor), torch.zeros_like(h))


@pytest.mark.parametrize("arch", ["llava", "blip2"])
def test_edits_only_image_positions_and_saves_one_adapter(
    arch, tiny_factory, tiny_images, tmp_path
):
    model, processor = tiny_factory(arch)
    editor = make_editor("visedit", model, processor)
    assert isinstance(editor, VisEditor) and editor.text_adapter is None
    assert editor.config.text_layer == editor.config.visual_layer
    for p in editor.parameters():  # as if trained
        torch.nn.init.normal_(p, std=0.3)
    image_q = encode([REQUEST.sample()], processor, editor.backbone, tiny_images)
    text_q = encode([REQUEST.sample().__class__(None, "nq question: who is it?", " man")],
                    processor, editor.backbone, tiny_images)
    with torch.no_grad():
        base_image, base_text = editor.logits(image_q), editor.logits(text_q)
        editor.apply([REQUEST], tiny_images)
        # No gate: every image input takes the edit; text-only inputs have no image positions.
        assert not torch.allclose(editor.logits(image_q), base_image)
        assert torch.equal(editor.logits(text_q), base_text)
    editor.save_pretrained(tmp_path / "saved")
    names = set(json.loads((tmp_path / "saved" / "adapter_config.json").read_text())["files"])
    assert "memory.json" in names
    # One layer, every position: the edit's states are written once, not as text and visual.
    index = json.loads((tmp_path / "saved" / "memory.json").read_text())
    assert index["same_as"] == {"visual": "text"}
    loaded = load_editor(model, processor, tmp_path / "saved")
    try:
        assert isinstance(loaded, VisEditor)
        assert set(loaded.state_tensors()) == set(editor.state_tensors())
        assert all(k.startswith("visual.") for k in loaded.state_tensors())
        assert any("influence" in k for k in loaded.state_tensors())
        with pytest.raises(ValueError, match="influence"):
            load_editor(model, processor, tmp_path / "saved", influence=False)
    finally:
        loaded.detach()
        editor.detach()


def test_trains_through_the_shared_loop_without_a_threshold(tiny_factory, tmp_path):
    train_split = write_tiny_mmedit(tmp_path / "data", n=10)
    model, processor = tiny_factory("llava")
    spec = get_method("visedit")
    result = spec.train(
        model, processor, train_split, config={"visual_layer": 2, "width": 16, "heads": 2},
        settings=TrainSettings(lr=1e-2, batch_size=4, max_steps=4, eval_every=2, val_edits=2,
                               log_every=1, patience=None),
        out_dir=tmp_path / "run", progress=False,
    )
    assert result.finish is None  # no gate, no tau to choose
    log = json.loads(result.log_path.read_text())
    assert log["meta"]["method"] == "visedit" and log["meta"]["config"]["influence"]
    losses = [e["loss"] for e in log["entries"] if e["kind"] == "train"]
    assert losses[-1] < losses[0]
    editor = load_editor(model, processor, result.best_dir)
    try:
        assert editor.name == "visedit" and editor.config.visual_layer == 2
    finally:
        editor.detach()
