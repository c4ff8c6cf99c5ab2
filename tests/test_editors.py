"""Registry, `none`, and `ft-l` (only its MLP trains; exact restore). The contract every method
meets is tests/test_contract.py."""

import pytest
import torch

from dualedit.backbones import get_backbone
from dualedit.data.prompts import encode, record_samples
from dualedit.data.records import EditRecord
from dualedit.data.requests import edit_requests
from dualedit.editors import (
    METHODS,
    FineTuneLayer,
    MethodSpec,
    NoEditor,
    editor_class,
    make_editor,
    register_method,
)
from dualedit.eval.scorers import token_accuracy

ARCHES = ["llava", "blip2"]


def record(index, image, alt, src="what color is the ball"):
    return EditRecord(
        index=index,
        src=src,
        pred="red",
        rephrase="which colour is the ball",
        alt=alt,
        image=image,
        image_rephrase="green.png",
        loc="nq question: what is the capital of the united states",
        loc_ans="the city",
        m_loc="yellow.png",
        m_loc_q="what shape is this",
        m_loc_a="square",
    )


RECORDS = [
    record(0, "red.png", "blue"),
    record(1, "blue.png", "star", src="what shape is the kite"),
]


def as_bytes(t):
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).clone()


def snapshot(model):
    """Byte copies of every state_dict tensor."""
    return {
        name: (t.dtype, tuple(t.shape), as_bytes(t)) for name, t in model.state_dict().items()
    }


def assert_byte_identical(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (dtype, shape, data) in before.items():
        assert after[name][0] == dtype and after[name][1] == shape, name
        assert torch.equal(after[name][2], data), f"{name} changed"


def rel_accuracy(model, processor, records, images):
    backbone = get_backbone(model)
    batch = encode([record_samples(r, "vqa")["rel"] for r in records], processor, backbone, images)
    with torch.no_grad():
        logits = backbone.forward_logits(
            model, batch.input_ids, batch.attention_mask, batch.pixel_values
        )
    return token_accuracy(logits, batch.target_ids, batch.target_mask).tolist()


def test_registry():
    assert METHODS["none"].editor is NoEditor and METHODS["ft-l"].editor is FineTuneLayer
    assert editor_class("ft-l") is FineTuneLayer
    assert METHODS["dualedit"].trainable and not METHODS["ft-l"].trainable
    with pytest.raises(ValueError, match="unknown method 'rome'"):
        editor_class("rome")

    class Impostor(NoEditor):
        pass

    with pytest.raises(ValueError, match="taken by NoEditor"):
        register_method(MethodSpec("none", Impostor, "another class under a taken name"))
    with pytest.raises(ValueError, match="must equal"):
        MethodSpec("ft-x", FineTuneLayer, "a spec whose name is not its editor's")


def test_options_are_validated(tiny_llava):
    model, processor = tiny_llava
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['step'\\]"):
        make_editor("ft-l", model, processor, step=3)
    with pytest.raises(ValueError, match="steps"):
        make_editor("ft-l", model, processor, steps=0)
    with pytest.raises(ValueError, match="lr"):
        make_editor("ft-l", model, processor, lr=-1.0)
    with pytest.raises(ValueError, match="layer 6 out of range"):
        make_editor("ft-l", model, processor, layer=6)
    with pytest.raises(ValueError, match="steps"):
        make_editor("none", model, processor, steps=3)


def test_none_changes_nothing(tiny_vlm, tiny_images):
    editor = make_editor("none", tiny_vlm.model, tiny_vlm.processor)
    before = snapshot(tiny_vlm.model)
    ids = editor.apply(edit_requests(RECORDS, "vqa"), tiny_images)
    assert ids == [0, 1] and [e.target for e in editor.edits()] == ["blue", "star"]
    assert_byte_identical(tiny_vlm.model, before)
    editor.restore()
    assert editor.batched and editor.config_dict() == {} and editor.edits() == []


@pytest.mark.parametrize("arch", ARCHES)
def test_ft_l_trains_only_its_mlp_and_restores_exactly(arch, tiny_factory, tiny_images):
    model, processor = tiny_factory(arch)
    model.train()  # mode must come back as it was
    editor = make_editor("ft-l", model, processor, steps=15, lr=1e-2)
    assert editor.layer == 5  # the last of 6 decoder layers
    mlp_names = {
        name for name, p in model.named_parameters()
        if any(p is q for q in editor.module.parameters())
    }
    assert mlp_names and all(".5." in name for name in mlp_names)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = snapshot(model)
    acc_before = rel_accuracy(model, processor, RECORDS[:1], tiny_images)

    editor.apply(edit_requests(RECORDS[:1], "vqa"), tiny_images)
    state = model.state_dict()
    changed = {name for name, t in state.items() if not torch.equal(as_bytes(t), before[name][2])}
    assert changed and changed <= mlp_names
    assert rel_accuracy(model, processor, RECORDS[:1], tiny_images) == [1.0] > acc_before
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.training

    editor.apply(edit_requests(RECORDS[1:], "vqa"), tiny_images)  # edits accumulate
    editor.restore()
    assert_byte_identical(model, before)
    assert rel_accuracy(model, processor, RECORDS[:1], tiny_images) == acc_before
    editor.restore()  # a second restore is a no-op
    assert_byte_identical(model, before)


@pytest.mark.parametrize("arch", ARCHES)
def test_ft_v_trains_only_the_vision_side_and_restores_exactly(arch, tiny_factory, tiny_images):
    """FT-V tunes what maps image features into the language model (LLaVA: the projector;
    BLIP-2: Q-Former, query tokens, language projection), with `vision_blocks` last encoder
    blocks on request; the language model is untouched and restore is byte-exact."""
    model, processor = tiny_factory(arch)
    editor = make_editor("ft-v", model, processor, steps=15, lr=1e-2, vision_blocks=1)
    tuned = {
        name for name, p in model.named_parameters()
        if any(p is q for q in editor.module.parameters())
    }
    adapter = ("multi_modal_projector",) if arch == "llava" else (
        "qformer", "query_tokens", "language_projection")
    last = len(editor.backbone.vision_blocks(model)) - 1
    blocks = {name for name in tuned if "encoder.layers" in name}
    assert blocks and all(f"encoder.layers.{last}." in name for name in blocks)
    assert all(any(part in name for part in adapter) for name in tuned - blocks)
    assert not any("language_model" in name for name in tuned)
    before = snapshot(model)
    acc_before = rel_accuracy(model, processor, RECORDS[:1], tiny_images)
    editor.apply(edit_requests(RECORDS[:1], "vqa"), tiny_images)
    state = model.state_dict()
    changed = {name for name, t in state.items() if not torch.equal(as_bytes(t), before[name][2])}
    assert changed and changed <= tuned
    assert editor.config_dict()["steps"] == 15 and editor.config_dict()["lr"] == 1e-2
    with editor.disabled():
        assert rel_accuracy(model, processor, RECORDS[:1], tiny_images) == acc_before
    editor.restore()
    assert_byte_identical(model, before)
    with pytest.raises(ValueError, match="vision_blocks: 9, but the vision encoder has"):
        make_editor("ft-v", model, processor, vision_blocks=9)


def test_ft_l_fits_several_records_together(tiny_factory, tiny_images):
    model, processor = tiny_factory("blip2")
    editor = make_editor("ft-l", model, processor, layer=5, steps=25, lr=1e-2, batch_size=1)
    assert editor.config_dict()["layer"] == 5
    assert rel_accuracy(model, processor, RECORDS, tiny_images) != [1.0, 1.0]
    with editor.applied(edit_requests(RECORDS, "vqa"), tiny_images):
        assert rel_accuracy(model, processor, RECORDS, tiny_images) == [1.0, 1.0]
    assert rel_accuracy(model, processor, RECORDS, tiny_images) != [1.0, 1.0]


def test_methods_from_entry_points_are_registered_and_broken_ones_skipped(monkeypatch, caplog):
    from types import SimpleNamespace

    import dualedit.editors.registry as registry

    class Plugin(NoEditor):
        name = "plugin-none"

    spec = MethodSpec("plugin-none", Plugin, "a plug-in method")
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    entries = [
        SimpleNamespace(name="good", value="pkg:METHOD", load=lambda: spec),
        SimpleNamespace(name="broken", value="pkg:gone", load=lambda: 1 / 0),
        SimpleNamespace(name="clash", value="pkg:CLASH",
                        load=lambda: MethodSpec("none", type("X", (NoEditor,), {}), "")),
    ]
    assert registry.register_entry_points(entries) == ["plugin-none"]
    assert registry.get_method("plugin-none") is spec
    assert registry.METHODS["none"].editor is NoEditor
    assert "'broken'" in caplog.text and "'clash'" in caplog.text
