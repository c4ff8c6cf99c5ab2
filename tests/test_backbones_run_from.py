"""`layer_input` / `run_layers` / `run_from`: running the decoder from a middle layer reproduces the
model's own forward exactly (float32, right padding, with and without images)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEPTH
from PIL import Image

from dualedit.data.prompts import Sample, encode

IMAGES = {
    "a": Image.new("RGB", (40, 30), (200, 10, 10)),
    "b": Image.new("RGB", (40, 30), (10, 10, 200)),
}


def image_batch(vlm):
    samples = [
        Sample("a", "what color is the ball ? the answer is :", " red"),
        Sample("b", "what is it ?", " a big red ball on the left ."),
    ]
    return encode(samples, vlm.processor, vlm.backbone, IMAGES.__getitem__)


def text_batch(vlm):
    samples = [
        Sample(None, "nq question: who was the leader of the united states ?", " man"),
        Sample(None, "nq question: capital ?", " city"),
    ]
    return encode(samples, vlm.processor, vlm.backbone, IMAGES.__getitem__)


@pytest.mark.parametrize("layer", range(DEPTH))
def test_run_from_reproduces_full_forward_with_images(tiny_vlm, layer):
    model, backbone = tiny_vlm.model, tiny_vlm.backbone
    batch = image_batch(tiny_vlm)
    assert not batch.attention_mask.all()  # padding is exercised
    with torch.no_grad():
        full = backbone.forward_logits(
            model, batch.input_ids, batch.attention_mask, batch.pixel_values
        )
        h = backbone.layer_input(
            model, layer, batch.input_ids, batch.attention_mask, batch.pixel_values
        )
        logits = backbone.run_from(model, layer, h, batch.attention_mask)
    assert h.shape == (*batch.input_ids.shape, 32)
    assert torch.equal(logits, full)


def test_run_from_text_only_and_selected_positions(tiny_vlm):
    model, backbone = tiny_vlm.model, tiny_vlm.backbone
    batch = text_batch(tiny_vlm)
    assert not batch.attention_mask.all()
    with torch.no_grad():
        full = backbone.forward_logits(model, batch.input_ids, batch.attention_mask)
        h = backbone.layer_input(model, 2, batch.input_ids, batch.attention_mask)
        logits = backbone.run_from(model, 2, h, batch.attention_mask)
        picked = backbone.run_from(model, 2, h, batch.attention_mask, logits_at=batch.target_mask)
    assert torch.equal(logits, full)
    assert picked.shape == (int(batch.target_mask.sum()), full.shape[-1])
    # The head on fewer rows is another GEMM shape: equal up to float32 rounding.
    torch.testing.assert_close(picked, full[batch.target_mask], rtol=1e-6, atol=1e-6)


def test_layer_input_stops_and_leaves_no_hooks(tiny_vlm):
    model, backbone = tiny_vlm.model, tiny_vlm.backbone
    batch = image_batch(tiny_vlm)
    ran = []
    later = backbone.layer(model, 3).register_forward_hook(lambda *a: ran.append(3))
    try:
        with torch.no_grad():
            backbone.layer_input(
                model, 3, batch.input_ids, batch.attention_mask, batch.pixel_values
            )
    finally:
        later.remove()
    assert ran == []  # layer 3 itself never ran
    assert all(not layer._forward_pre_hooks for layer in backbone.decoder_layers(model))


def test_run_layers_fires_hooks_and_keeps_outputs(tiny_vlm):
    """A forward hook on a later layer changes run_from exactly as it changes the full forward,
    and `keep` returns the (hooked) outputs of the layers asked for."""
    model, backbone = tiny_vlm.model, tiny_vlm.backbone
    batch = image_batch(tiny_vlm)
    seen: dict[str, torch.Tensor] = {}

    def shift(module, args, output):
        seen["out"] = output + 0.5
        return output + 0.5

    handle = backbone.layer(model, 4).register_forward_hook(shift)
    try:
        with torch.no_grad():
            full = backbone.forward_logits(
                model, batch.input_ids, batch.attention_mask, batch.pixel_values
            )
            h = backbone.layer_input(
                model, 1, batch.input_ids, batch.attention_mask, batch.pixel_values
            )
            out, kept = backbone.run_layers(model, h, batch.attention_mask, 1, 5, keep=(4,))
            logits = backbone.run_from(model, 1, h, batch.attention_mask)
    finally:
        handle.remove()
    assert torch.equal(logits, full)
    assert torch.equal(kept[4], out) and torch.equal(out, seen["out"])
    with torch.no_grad():
        unhooked = backbone.forward_logits(
            model, batch.input_ids, batch.attention_mask, batch.pixel_values
        )
    assert not torch.equal(unhooked, full)


def test_run_layers_range_checked(tiny_vlm):
    h = torch.zeros(1, 3, 32)
    with pytest.raises(ValueError, match="start 4 <= stop 2"):
        tiny_vlm.backbone.run_layers(tiny_vlm.model, h, torch.ones(1, 3), 4, 2)
    with pytest.raises(ValueError, match="start 7 <= stop 6"):
        tiny_vlm.backbone.run_from(tiny_vlm.model, DEPTH + 1, h, torch.ones(1, 3))
