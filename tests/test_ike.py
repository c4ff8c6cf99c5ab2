"""IKE: the new fact (and k retrieved demonstrations) read in context before the question, the
weights untouched; the prefix lands after the image and the logits come back aligned."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_train_data import write_tiny_mmedit

from dualedit.data.prompts import Sample, encode, encode_prompts
from dualedit.data.requests import EditRequest
from dualedit.editors import make_editor
from dualedit.editors.ike import TEMPLATES, demonstration_kinds
from dualedit.editors.prefix import head_tokens, insert_prefix, prompt_start

REQUESTS = [
    EditRequest("red.png", "what color is the ball? the answer is:", "blue"),
    EditRequest("blue.png", "what shape is the kite? the answer is:", "star"),
]
QUESTIONS = [
    Sample("red.png", "what color is the ball? the answer is:", " blue"),
    Sample("green.png", "what shape is the kite? the answer is:", " star"),
]


def context_text(template: str, request: EditRequest) -> str:
    fact_prefix, question_prefix, _ = TEMPLATES[template]
    return fact_prefix + request.prompt + " " + request.target + question_prefix


@pytest.mark.parametrize("arch", ["llava", "blip2"])
def test_the_fact_is_read_before_the_question_and_logits_stay_aligned(
    arch, tiny_factory, tiny_images
):
    """Editing = reading the fact in the prompt: IKE's logits at the question's target positions
    equal the plain model's on the question with the fact written into its prompt text."""
    model, processor = tiny_factory(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = make_editor("ike", model, processor, k=0, template="ike")
    editor.apply(REQUESTS[:1], tiny_images)
    batch = encode(QUESTIONS, processor, editor.backbone, tiny_images)
    written = [
        Sample(q.image, context_text("ike", REQUESTS[0]) + q.prompt, q.target) for q in QUESTIONS
    ]
    reference = encode(written, processor, editor.backbone, tiny_images)
    with torch.no_grad():
        ike = editor.logits(batch)
        plain = editor.backbone.forward_logits(
            model, reference.input_ids, reference.attention_mask, reference.pixel_values
        )
        with editor.disabled():
            unedited = editor.logits(batch)
    assert ike.shape == unedited.shape  # the caller's positions
    for row in range(len(QUESTIONS)):
        got = ike[row][batch.target_mask[row]]
        want = plain[row][reference.target_mask[row]]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ike[batch.target_mask], unedited[batch.target_mask])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    editor.restore()
    with torch.no_grad():
        assert torch.equal(editor.logits(batch), unedited)


def test_insert_prefix_keeps_padding_side_targets_and_prompt_ends(tiny_llava, tiny_images):
    model, processor = tiny_llava
    editor = make_editor("ike", model, processor)
    backbone, tokenizer = editor.backbone, processor.tokenizer
    head = head_tokens(processor, backbone, True)
    prefixes = [[7, 8, 9], []]
    for batch in (
        encode(QUESTIONS, processor, backbone, tiny_images),
        encode_prompts(QUESTIONS, processor, backbone, tiny_images, padding_side="left"),
    ):
        mask = batch.attention_mask.bool()
        rows = [batch.input_ids[i][mask[i]].tolist() for i in range(2)]
        starts = [prompt_start(row, head, {tokenizer.bos_token_id}) for row in rows]
        assert starts == [len(head)] * 2  # after <s> and the image placeholders
        out = insert_prefix(
            batch, prefixes, starts, pad_id=tokenizer.pad_token_id, backbone=backbone
        )
        new = out.batch
        for i in range(2):
            tokens = new.input_ids[i][new.attention_mask[i].bool()].tolist()
            assert tokens == rows[i][: starts[i]] + prefixes[i] + rows[i][starts[i]:]
            # Every original token is found where the index says.
            moved = new.input_ids[i][out.index[i][mask[i]]]
            assert torch.equal(moved, batch.input_ids[i][mask[i]])
            assert new.input_ids[i, new.prompt_end[i]] == batch.input_ids[i, batch.prompt_end[i]]
        assert new.image_mask.sum() == batch.image_mask.sum()
        if hasattr(batch, "target_mask"):
            targets = batch.target_ids[batch.target_mask]
            assert torch.equal(new.target_ids[new.target_mask], targets)
        else:
            assert new.attention_mask[:, -1].all()  # still left-padded: prompts end together


def test_demonstrations_are_the_nearest_records_in_the_ike_mix(
    tiny_factory, tiny_images, tmp_path
):
    write_tiny_mmedit(tmp_path, n=12)
    model, processor = tiny_factory("llava")
    editor = make_editor("ike", model, processor, k=4, demo_data=str(tmp_path), template="plain")
    # The nearest train record shares "star", "red" and "car" (record 3).
    question = "what is the star on the red picture ? the answer is:"
    request = EditRequest("red.png", question, "car")
    editor.apply([request], tiny_images)
    (fact,) = editor.facts
    assert len(fact.demonstrations) == 4
    decoded = [processor.tokenizer.decode(d) for d in fact.demonstrations]
    # The nearest train record (same shape and colour words) is the last, next to the question.
    assert "star on the red picture ? the answer is : car" in decoded[-1]
    kinds = demonstration_kinds(4)
    assert sorted(kinds) == ["copy", "retain", "retain", "update"]
    assert [demonstration_kinds(8).count(k) for k in ("copy", "update", "retain")] == [1, 3, 4]
    # A retain demonstration asks the record's unrelated text question.
    for text, kind in zip(decoded, kinds):
        assert ("nq question" in text) == (kind == "retain")


def test_demonstrations_that_do_not_fit_are_dropped_least_similar_first(
    tiny_factory, tiny_images, tmp_path
):
    write_tiny_mmedit(tmp_path, n=12)
    model, processor = tiny_factory("llava")
    editor = make_editor("ike", model, processor, k=4, demo_data=str(tmp_path))
    editor.apply(REQUESTS[:1], tiny_images)
    (fact,) = editor.facts
    editor.max_positions = 10 + sum(map(len, fact.demonstrations)) + len(fact.context)
    full = editor._prefix(fact, 10)
    assert len(full) == sum(map(len, fact.demonstrations)) + len(fact.context)
    editor.max_positions = 10 + len(fact.context) + len(fact.demonstrations[-1])
    assert editor._prefix(fact, 10) == fact.demonstrations[-1] + fact.context
    editor.max_positions = 10 + len(fact.context) - 1
    with pytest.raises(ValueError, match="does not fit"):
        editor._prefix(fact, 10)


def test_each_question_reads_its_nearest_fact(tiny_factory, tiny_images):
    model, processor = tiny_factory("blip2")
    editor = make_editor("ike", model, processor, k=0)
    editor.apply(REQUESTS, tiny_images)
    batch = encode(QUESTIONS, processor, editor.backbone, tiny_images)
    new = editor.prefixed(batch).batch
    for i, fact in enumerate(editor.facts):
        row = new.input_ids[i][new.attention_mask[i].bool()].tolist()
        n = len(fact.context)
        assert any(row[j : j + n] == fact.context for j in range(len(row) - n + 1))
    editor.remove(editor.facts[0].id)
    assert [e.target for e in editor.edits()] == ["star"]


def test_a_given_encoder_retrieves_and_options_are_checked(tiny_factory, tiny_images, tmp_path):
    write_tiny_mmedit(tmp_path, n=12)
    model, processor = tiny_factory("llava")
    seen = []

    def encoder(texts):
        seen.append(len(texts))
        return torch.tensor([[len(t), t.count("red"), 1.0] for t in texts])

    editor = make_editor("ike", model, processor, k=2, demo_data=str(tmp_path), encoder=encoder)
    editor.apply(REQUESTS[:1], tiny_images)
    assert editor.config.retriever == "encoder" and seen[0] == 12  # the pool, embedded once
    assert len(editor.facts[0].demonstrations) == 2
    with pytest.raises(ValueError, match="needs the text encoder"):
        make_editor("ike", model, processor, retriever="encoder")
    for bad in ({"k": -1}, {"template": "chat"}, {"demo_task": "text"}, {"pool": 0}):
        with pytest.raises(ValueError, match="ike option"):
            make_editor("ike", model, processor, **bad)
    assert dataclasses.asdict(make_editor("ike", model, processor).config)["k"] is None
