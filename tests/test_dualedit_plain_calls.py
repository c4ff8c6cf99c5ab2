"""Plain `model(**inputs)` / `model.generate(**inputs)` with DualEdit edits stored, on the tiny
LLaVA and BLIP-2: the same as the editor's own calls, gate per input, disabled, removed, left
padding, beams, and no hooks or per-call state left behind."""

import math

import pytest
import torch

from dualedit.backbones import get_backbone
from dualedit.data.prompts import Sample, encode, encode_prompts
from dualedit.editors.dualedit import DualEditor

EDIT = ("red.png", "what color is the ball? the answer is:", "blue")
RELATED = Sample("red.png", "what color is the ball? the answer is:", " blue")
UNRELATED = Sample("blue.png", "how many dogs are there in the picture? the answer is:", " two")
GREEDY = {"max_new_tokens": 4, "do_sample": False, "num_beams": 1}


def randomise_outputs(editor, seed):
    """Non-zero output projections, so that a stored edit changes the layer outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in (editor.text_adapter, editor.visual_adapter):
            for p in adapter.out.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))


@pytest.fixture
def editor(tiny_vlm, tiny_images):
    """An editor with one stored edit and non-zero adapter outputs (seed 1 flips the related
    question's greedy answer on both tiny models), detached after the test."""
    made = DualEditor(tiny_vlm.model, tiny_vlm.processor, tau=0.999)
    randomise_outputs(made, seed=1)
    made.edit(tiny_images(EDIT[0]), EDIT[1], EDIT[2], edit_id="ball")
    yield made
    made.detach()


def new_tokens(out, input_ids):
    """generate() output without the prompt (LLaVA and BLIP-2 5.x both return prompt + new)."""
    assert torch.equal(out[:, : input_ids.shape[1]], input_ids)
    return out[:, input_ids.shape[1] :]


def plain_generate(model, prompts, **kwargs):
    with torch.no_grad():
        out = model.generate(**prompts.model_inputs(), **{**GREEDY, **kwargs})
    return new_tokens(out, prompts.input_ids)


def no_leftover_state(editor):
    return editor.hooks.hook_set.idle


def test_plain_generate_is_edited_like_editor_generate(tiny_vlm, tiny_images, editor):
    vlm = tiny_vlm
    prompts = encode_prompts([RELATED, UNRELATED], vlm.processor, vlm.backbone, tiny_images)
    assert prompts.attention_mask[0, 0] == 0  # the related prompt is left padded
    inputs = (prompts.input_ids, prompts.attention_mask, prompts.pixel_values)
    with torch.no_grad(), editor.disabled():
        base = plain_generate(tiny_vlm.model, prompts)
    plain = plain_generate(tiny_vlm.model, prompts)
    assert no_leftover_state(editor)
    with torch.no_grad():
        explicit = editor.generate_from(*inputs, **GREEDY)
    assert torch.equal(plain, explicit)
    assert not torch.equal(plain[0], base[0])  # related: edited
    assert torch.equal(plain[1], base[1])  # unrelated: gate closed
    # Beams: generate() repeats each row per beam before the prompt pass.
    with torch.no_grad():
        beams = plain_generate(tiny_vlm.model, prompts, num_beams=2)
        explicit_beams = editor.generate_from(*inputs, **{**GREEDY, "num_beams": 2})
    assert torch.equal(beams, explicit_beams)
    # Removing the edit gives the base answers back.
    editor.remove("ball")
    assert torch.equal(plain_generate(tiny_vlm.model, prompts), base)


def test_plain_generate_from_the_processor(tiny_vlm, tiny_images, editor):
    """As a user writes it: processor(images=..., text=...) straight into model.generate."""
    text = tiny_vlm.backbone.prompt_text(RELATED.prompt, has_image=True)
    inputs = tiny_vlm.processor(images=tiny_images("red.png"), text=text, return_tensors="pt")
    ids = inputs["input_ids"]
    with torch.no_grad():
        with editor.disabled():
            base = new_tokens(tiny_vlm.model.generate(**inputs, **GREEDY), ids)
        edited = new_tokens(tiny_vlm.model.generate(**inputs, **GREEDY), ids)
        explicit = editor.generate_from(ids, inputs["attention_mask"], inputs["pixel_values"], **GREEDY)
    assert torch.equal(edited, explicit) and not torch.equal(edited, base)
    decision = editor.explain(tiny_images("red.png"), RELATED.prompt)
    assert decision.edit_id == "ball" and decision.gate_open and decision.edited
    assert decision.similarity == pytest.approx(1.0, abs=1e-5)
    other = editor.explain(tiny_images("blue.png"), UNRELATED.prompt)
    assert other.edit_id == "ball" and not other.gate_open and not other.edited
    assert other.similarity < 0.999


def test_plain_forward_equals_forward_logits(tiny_vlm, tiny_images, editor):
    # Prompts alone, right padded: the related prompt is the shorter row.
    prompts = encode_prompts(
        [RELATED, UNRELATED], tiny_vlm.processor, tiny_vlm.backbone, tiny_images, "right"
    )
    assert prompts.attention_mask[0, -1] == 0
    with torch.no_grad():
        with editor.disabled():
            base = tiny_vlm.model(**prompts.model_inputs()).logits
        plain = tiny_vlm.model(**prompts.model_inputs()).logits
        explicit = editor.forward_logits(
            prompts.input_ids, prompts.attention_mask, prompts.pixel_values
        )
        # With the answer in the input, the last token (the gate key) is the answer's.
        batch = encode([RELATED, UNRELATED], tiny_vlm.processor, tiny_vlm.backbone, tiny_images)
        plain_tf = tiny_vlm.model(**batch.model_inputs()).logits
        explicit_tf = editor.forward_logits(
            batch.input_ids, batch.attention_mask, batch.pixel_values
        )
    assert no_leftover_state(editor)
    assert torch.equal(plain, explicit)  # prompt_end = each row's last token in both
    assert not torch.allclose(plain[0], base[0])
    assert torch.equal(plain[1], base[1])
    assert torch.equal(plain_tf, explicit_tf)


def test_text_only_plain_calls(tiny_vlm, tiny_images):
    """Text-only questions: BLIP-2 runs its OPT language model alone (ids reach the decoder
    directly), LLaVA its full forward without pixels."""
    editor = DualEditor(tiny_vlm.model, tiny_vlm.processor, gate=False)
    try:
        randomise_outputs(editor, seed=2)
        editor.edit(None, "what is the capital of the country? the answer is:", "one")
        sample = Sample(None, "what is the name of the city? the answer is:", " two")
        batch = encode([sample], tiny_vlm.processor, tiny_vlm.backbone, tiny_images)
        run = (tiny_vlm.model, batch.input_ids, batch.attention_mask)
        with torch.no_grad():
            with editor.disabled():
                base = tiny_vlm.backbone.forward_logits(*run)
            plain = tiny_vlm.backbone.forward_logits(*run)  # no context opened by us
            explicit = editor.forward_logits(batch.input_ids, batch.attention_mask)
        assert torch.equal(plain, explicit) and not torch.allclose(plain, base)
    finally:
        editor.detach()


def test_detach_leaves_no_hooks_and_the_weights_alone(tiny_factory, tiny_images):
    model, processor = tiny_factory("llava")
    kinds = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
    )

    def hook_counts():
        return {
            (name, kind): len(getattr(module, kind))
            for name, module in model.named_modules()
            for kind in kinds
        }

    prompts = encode_prompts([RELATED], processor, get_backbone(model), tiny_images)
    plain_generate(model, prompts)  # transformers adds its own hooks on a first call
    before = hook_counts()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    editor = DualEditor(model, processor, tau=0.5)
    assert sum(hook_counts().values()) > sum(before.values())
    randomise_outputs(editor, seed=1)
    editor.edit(tiny_images("red.png"), EDIT[1], EDIT[2])
    with editor.disabled():
        base = plain_generate(model, prompts)
    assert not torch.equal(plain_generate(model, prompts), base)
    editor.detach()
    assert hook_counts() == before
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    # Detached: a plain call is the base model's, with the edit still stored.
    assert len(editor.edits()) == 1
    assert torch.equal(plain_generate(model, prompts), base)


def test_explain_without_edits(tiny_vlm, tiny_images):
    editor = DualEditor(tiny_vlm.model, tiny_vlm.processor)
    try:
        decision = editor.explain(tiny_images("red.png"), RELATED.prompt)
    finally:
        editor.detach()
    assert decision.edit_id is None and math.isnan(decision.similarity) and not decision.edited
