"""DualEditor on the tiny LLaVA and BLIP-2: identity, frozen base, gate per input, generation,
truncated edit pass, many edits, bfloat16, and the harness driving it."""

import pytest
import torch

from dualedit.data.prompts import Sample, encode, encode_prompts
from dualedit.editors.capture import LayerTrace
from dualedit.editors.dualedit import DualEditor, text_positions
from dualedit.editors.dualedit.heads import GateHeads

# The edit, a query that is the edit itself (same image, prompt and target), and an unrelated
# query that is longer, so that the edit's query is the padded row in a batch of the two.
EDIT = ("red.png", "what color is the ball? the answer is:", "blue")
RELATED = Sample("red.png", "what color is the ball? the answer is:", " blue")
UNRELATED = Sample("blue.png", "how many dogs are there in the picture? the answer is:", " two")
OTHER = ("green.png", "what shape is the kite? the answer is:", "star")


@pytest.fixture
def make(tiny_vlm):
    """make(**options) -> a DualEditor on the shared tiny model, detached after the test."""
    made = []

    def build(**options):
        editor = DualEditor(tiny_vlm.model, tiny_vlm.processor, **options)
        made.append(editor)
        return editor

    yield build
    for editor in made:
        editor.detach()


def randomise_outputs(editor, seed=0, std=1.0):
    """Non-zero output projections, so that an applied edit changes the layer outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in (editor.text_adapter, editor.visual_adapter):
            for p in adapter.out.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def with_heads(editor, seed=0):
    """The editor, given unfitted (seeded, random) gate heads when its key is the learned one:
    its decisions then follow the heads' cosines like a fitted key's."""
    if editor.config.gate_key == "learned":
        torch.manual_seed(seed)
        editor.memory.set_gate_heads(GateHeads(editor.memory.hidden_size))
    return editor


def add_edit(editor, images, spec=EDIT, **kwargs):
    image, prompt, target = spec
    return editor.edit(images(image), prompt, target, **kwargs)


def logits_of(vlm, editor, batch, **session):
    """Edited logits and the call context (`editor.session` with the batch's prompt ends)."""
    inputs = (vlm.model, batch.input_ids, batch.attention_mask, batch.pixel_values)
    with (
        torch.no_grad(),
        editor.session(batch.input_ids, batch.attention_mask, batch.prompt_end, **session) as ctx,
    ):
        logits = vlm.backbone.forward_logits(*inputs)
    return logits, ctx


def base_logits(vlm, editor, batch):
    """The unedited model's logits (the editor stays attached, disabled)."""
    inputs = (vlm.model, batch.input_ids, batch.attention_mask, batch.pixel_values)
    with torch.no_grad(), editor.disabled():
        return vlm.backbone.forward_logits(*inputs)


def gate_pass(vlm, editor, images, group, padding, layer=2):
    """Encode `group` (right padding: prompt + target, teacher forcing; left: the prompts alone,
    as for generate), read the text layer's states with the editor off, then run the edited
    forward. Returns (batch, prompt_end given to the session or None, states [batch, seq,
    hidden], the call context)."""
    if padding == "right":
        batch = encode(group, vlm.processor, vlm.backbone, images)
        end = batch.prompt_end
    else:
        prompts = [Sample(s.image, s.prompt, "") for s in group]
        batch = encode_prompts(prompts, vlm.processor, vlm.backbone, images)
        end = None
    inputs = (vlm.model, batch.input_ids, batch.attention_mask, batch.pixel_values)
    with torch.no_grad(), editor.disabled():
        with LayerTrace(vlm.model, vlm.backbone, [layer], stop=True) as trace:
            h = trace.run(lambda: vlm.backbone.forward_logits(*inputs))[layer]
    with torch.no_grad(), editor.session(batch.input_ids, batch.attention_mask, end) as ctx:
        vlm.backbone.forward_logits(*inputs)
    return batch, end, h, ctx


def as_bytes(t):
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).clone()


def snapshot(model):
    return {name: as_bytes(t) for name, t in model.state_dict().items()}


def test_identity_at_initialisation(tiny_vlm, tiny_images, make):
    editor = make(gate=False)  # every input edited: the adapters really run
    add_edit(editor, tiny_images)
    batch = encode([RELATED, UNRELATED], tiny_vlm.processor, tiny_vlm.backbone, tiny_images)
    base = base_logits(tiny_vlm, editor, batch)
    edited, ctx = logits_of(tiny_vlm, editor, batch)
    assert ctx.active and ctx.open.all()
    assert torch.equal(edited, base)


def test_only_adapter_parameters_train(tiny_vlm, tiny_images, make):
    model = tiny_vlm.model
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    editor = make()
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in editor.parameters())
    # A trainer's step: edits given per input, gate off, gradient from the target tokens.
    batch = encode([RELATED, UNRELATED], tiny_vlm.processor, tiny_vlm.backbone, tiny_images)
    edits = editor.encode_edits([tiny_images("red.png")] * 2, [EDIT[1]] * 2, [EDIT[2]] * 2)
    with editor.session(
        batch.input_ids, batch.attention_mask, batch.prompt_end, edits=edits, gate=False
    ):
        logits = tiny_vlm.backbone.forward_logits(
            model, batch.input_ids, batch.attention_mask, batch.pixel_values
        )
    logits[batch.target_mask].logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    for adapter in (editor.text_adapter, editor.visual_adapter):
        assert adapter.out.weight.grad is not None and adapter.out.weight.grad.abs().sum() > 0
    editor.detach()
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_base_weights_and_hooks_are_left_exactly(tiny_vlm, tiny_images, make):
    model, backbone = tiny_vlm.model, tiny_vlm.backbone
    before = snapshot(model)
    layers = backbone.decoder_layers(model)
    foreign = layers[3].register_forward_hook(lambda module, args, output: None)
    counts = [len(layer._forward_hooks) for layer in layers]
    attributes = [set(vars(layer)) for layer in layers]
    try:
        editor = make(tau=0.5)
        randomise_outputs(editor)
        eid = add_edit(editor, tiny_images)
        batch = encode([RELATED, UNRELATED], tiny_vlm.processor, backbone, tiny_images)
        logits_of(tiny_vlm, editor, batch)
        editor.remove(eid)
        editor.detach()
        assert [len(layer._forward_hooks) for layer in layers] == counts
        assert [set(vars(layer)) for layer in layers] == attributes
        assert foreign.id in layers[3]._forward_hooks  # someone else's hook is still there
    finally:
        foreign.remove()
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


@pytest.mark.parametrize(
    "gate_key",
    ["prompt_end", "prompt_end_image", "prompt_end_and_image", "prompt_end_image_groups",
     "learned"],
)
@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_gate_per_input_with_right_padding(tiny_vlm, tiny_images, make, order, gate_key):
    editor = with_heads(make(tau=0.999, gate_key=gate_key))
    randomise_outputs(editor)
    add_edit(editor, tiny_images)
    samples = [(RELATED, UNRELATED)[i] for i in order]
    batch = encode(samples, tiny_vlm.processor, tiny_vlm.backbone, tiny_images)
    related = order.index(0)
    assert batch.attention_mask[related].sum() < batch.attention_mask.shape[1]  # padded row
    base = base_logits(tiny_vlm, editor, batch)
    edited, ctx = logits_of(tiny_vlm, editor, batch)
    assert ctx.similarity[related] == pytest.approx(1.0, abs=1e-5)
    assert ctx.open.tolist() == [i == related for i in range(2)]
    assert torch.equal(edited[1 - related], base[1 - related])  # bit for bit
    assert not torch.allclose(edited[related], base[related])
    # Gate off: the unrelated input is edited too.
    edited_all, ctx_all = logits_of(tiny_vlm, editor, batch, gate=False)
    assert ctx_all.open.all() and not torch.allclose(edited_all[1 - related], base[1 - related])


@pytest.mark.parametrize("prompt_end", [False, True])
@pytest.mark.parametrize(
    "options, text_rows, image_rows",
    [
        ({}, [True, False], [True, False]),
        ({"use_text": False}, [False, False], [True, False]),
        ({"use_visual": False}, [True, False], [False, False]),
        ({"gate_scope": "text"}, [True, False], [True, True]),
    ],
)
def test_adapters_edit_exactly_their_positions(
    tiny_vlm, tiny_images, make, options, text_rows, image_rows, prompt_end
):
    editor = make(text_layer=2, visual_layer=4, tau=0.999, text_prompt_end=prompt_end, **options)
    randomise_outputs(editor)
    add_edit(editor, tiny_images)
    batch = encode([RELATED, UNRELATED], tiny_vlm.processor, tiny_vlm.backbone, tiny_images)
    inputs = (tiny_vlm.model, batch.input_ids, batch.attention_mask, batch.pixel_values)

    def layer_outputs():
        # Registered after the editor's hooks, so it sees the edited outputs.
        with LayerTrace(tiny_vlm.model, tiny_vlm.backbone, [2, 4], stop=True) as trace:
            return trace.run(lambda: tiny_vlm.backbone.forward_logits(*inputs))

    with torch.no_grad():
        with editor.disabled():
            base = layer_outputs()
        with editor.context(batch):
            edited = layer_outputs()
    changed = {k: (edited[k] - base[k]).abs().amax(dim=-1) > 0 for k in (2, 4)}  # [b, s]
    text = text_positions(
        batch.image_mask, batch.attention_mask, batch.prompt_end, include_prompt_end=prompt_end
    )
    expected_text = text & torch.tensor(text_rows)[:, None]
    assert text[0].any() and torch.equal(changed[2], expected_text)
    # Image positions come before any text in both layouts, so only the visual adapter
    # changes them at layer 4.
    image = batch.image_mask
    assert torch.equal(changed[4] & image, image & torch.tensor(image_rows)[:, None])
    # Answer tokens are never edited at the text layer; the last prompt token (whose output
    # predicts the first answer token) only with text_prompt_end.
    rows = torch.arange(2)
    answers = batch.target_mask.clone()
    answers[rows, batch.prompt_end] = False
    assert not (changed[2] & answers).any()
    at_end = changed[2][rows, batch.prompt_end]
    assert at_end.tolist() == [prompt_end and text_rows[0], False]


@pytest.mark.parametrize("prompt_end, changes", [(False, False), (True, True)])
def test_text_adapter_on_the_last_layer_reaches_the_first_answer_token_only_with_prompt_end(
    tiny_vlm, tiny_images, make, prompt_end, changes
):
    """With the released positions, a text adapter on the last decoder layer cannot change the
    prediction of the first answer token: nothing above it carries the edit to the prompt end.
    This is why adapters trained that way learn slowly (the first answer token is reached only
    through attention in the layers above t)."""
    last = tiny_vlm.backbone.depth(tiny_vlm.model) - 1
    editor = make(
        text_layer=last, visual_layer=last, use_visual=False, gate=False, text_prompt_end=prompt_end
    )
    randomise_outputs(editor)
    add_edit(editor, tiny_images)
    batch = encode([RELATED], tiny_vlm.processor, tiny_vlm.backbone, tiny_images)
    base = base_logits(tiny_vlm, editor, batch)
    edited, _ = logits_of(tiny_vlm, editor, batch)
    end = int(batch.prompt_end[0])
    assert not torch.equal(edited[0, :end], base[0, :end])  # the adapter acts in both cases
    assert (not torch.equal(edited[0, end], base[0, end])) == changes
    # Positions after the prompt end (answer tokens) are never edited.
    assert torch.equal(edited[0, end + 1 :], base[0, end + 1 :])


def test_gate_key_prompt_end_ignores_the_answer_last_position_does_not(tiny_vlm, tiny_images, make):
    other_answer = Sample(RELATED.image, RELATED.prompt, " red")
    batch = encode([RELATED, other_answer], tiny_vlm.processor, tiny_vlm.backbone, tiny_images)
    honest = make(tau=0.999)
    add_edit(honest, tiny_images)
    _, ctx = logits_of(tiny_vlm, honest, batch)
    honest.detach()
    torch.testing.assert_close(ctx.similarity, torch.ones(2), atol=1e-5, rtol=0)
    released = make(tau=0.999, gate_key="last_position")
    add_edit(released, tiny_images)
    _, ctx = logits_of(tiny_vlm, released, batch)
    # The released key compares the last target token: it sees the answer.
    assert ctx.similarity[0] == pytest.approx(1.0, abs=1e-5) and ctx.similarity[1] < 0.999
    assert ctx.open.tolist() == [True, False]


@pytest.mark.parametrize(
    "gate_key",
    ["prompt_end", "prompt_end_image", "prompt_end_and_image", "prompt_end_image_groups",
     "learned"],
)
def test_generate_keeps_the_prompt_pass_decision(tiny_vlm, tiny_images, make, gate_key):
    backbone, processor = tiny_vlm.backbone, tiny_vlm.processor
    # Released text positions and text keys: the seed was chosen for them (its edit flips the
    # first answer on both models). Random adapters that also edit the prompt end can emit the
    # image placeholder id, which an uncached re-run of the prompt then rejects.
    editor = with_heads(make(tau=0.999, text_prompt_end=False, text_keys="all",
                             gate_key=gate_key))
    randomise_outputs(editor, seed=1)
    add_edit(editor, tiny_images)
    prompts = encode_prompts([RELATED, UNRELATED], processor, backbone, tiny_images)
    assert prompts.attention_mask[0, 0] == 0  # the related prompt is left padded
    kwargs = {"max_new_tokens": 4, "do_sample": False, "num_beams": 1}
    inputs = (prompts.input_ids, prompts.attention_mask, prompts.pixel_values)
    with torch.no_grad():
        with editor.disabled():
            base = backbone.generate(tiny_vlm.model, *inputs, **kwargs)
        with editor.session(prompts.input_ids, prompts.attention_mask) as ctx:
            cached = backbone.generate(tiny_vlm.model, *inputs, **kwargs)
        uncached = editor.generate_from(*inputs, use_cache=False, **kwargs)
    assert ctx.open.tolist() == [True, False]
    assert torch.equal(cached[1], base[1])  # unrelated: unedited
    assert not torch.equal(cached[0], base[0])  # related: the edit changes the answer
    assert torch.equal(uncached, cached)  # full re-runs keep the same decision and positions
    beam = {**kwargs, "num_beams": 2}
    with torch.no_grad():
        with editor.disabled():
            base_beams = backbone.generate(tiny_vlm.model, *inputs, **beam)
        beams = editor.generate_from(*inputs, **beam)  # rows repeated per beam inside generate()
    assert torch.equal(beams[1], base_beams[1]) and not torch.equal(beams[0], base_beams[0])
    # Greedy generation agrees with a teacher-forced pass over prompt + generated tokens.
    sample = Sample(RELATED.image, RELATED.prompt, "")
    single = encode_prompts([sample], processor, backbone, tiny_images)
    with torch.no_grad():
        new = editor.generate_from(
            single.input_ids, single.attention_mask, single.pixel_values, **kwargs
        )
        full_ids = torch.cat([single.input_ids, new], dim=1)
        logits = editor.forward_logits(
            full_ids, torch.ones_like(full_ids), single.pixel_values, prompt_end=single.prompt_end
        )
    end = int(single.prompt_end[0])
    assert torch.equal(logits[0, end : end + new.shape[1]].argmax(-1), new[0])
    assert torch.equal(new[0], cached[0])


@pytest.mark.parametrize("padding", ["right", "left"])
def test_prompt_end_image_key_is_the_mean_of_the_prompt_end_and_image_cosines(
    tiny_vlm, tiny_images, make, padding
):
    """Per input of a padded batch, the gate similarity equals the mean of the cosine at the
    last prompt token and the cosine of the image positions' mean state (text layer), computed
    here by hand; a text-only input scores its prompt-end cosine / sqrt(2)."""
    import torch.nn.functional as F

    editor = make(text_layer=2, visual_layer=4, gate_key="prompt_end_image", tau=0.999)
    add_edit(editor, tiny_images)
    same_question = Sample("green.png", RELATED.prompt, RELATED.target)
    samples = [same_question, UNRELATED, Sample(None, RELATED.prompt, RELATED.target)]
    groups = [samples[:2], samples[2:]]
    edit = editor.memory.states([0])
    for group in groups:
        batch, end, h, ctx = gate_pass(tiny_vlm, editor, tiny_images, group, padding)
        ends = batch.prompt_end
        for row in range(len(group)):
            pe = h[row, int(ends[row])]
            cos_end = F.cosine_similarity(pe, edit.keys["prompt_end"][0], dim=0)
            image = batch.image_mask[row].bool() & batch.attention_mask[row].bool()
            if image.any():
                mean = h[row][image].mean(dim=0)
                cos_image = F.cosine_similarity(mean, edit.keys["image_mean"][0], dim=0)
                expected = (cos_end + cos_image) / 2
            else:
                expected = cos_end / 2**0.5
            assert ctx.similarity[row].item() == pytest.approx(expected.item(), abs=1e-5)
        assert not ctx.open.any()


@pytest.mark.parametrize("padding", ["right", "left"])
def test_prompt_end_image_groups_key_by_hand(tiny_vlm, tiny_images, make, padding):
    """Per input of a padded batch: the mean of the prompt-end cosine and the mean over
    IMAGE_GROUPS contiguous groups of image positions of the group-mean cosines (text layer),
    computed here by hand; a text-only input scores its prompt-end cosine / sqrt(2)."""
    import torch.nn.functional as F

    from dualedit.editors.dualedit.gate import IMAGE_GROUPS

    editor = make(text_layer=2, visual_layer=4, gate_key="prompt_end_image_groups", tau=0.999)
    add_edit(editor, tiny_images)
    edit_groups = editor.memory.states([0]).keys["image_groups"][0].view(IMAGE_GROUPS, -1)
    edit_end = editor.memory.states([0]).keys["prompt_end"][0]
    same_question = Sample("green.png", RELATED.prompt, RELATED.target)
    samples = [same_question, UNRELATED, Sample(None, RELATED.prompt, RELATED.target)]
    for group in (samples[:2], samples[2:]):
        batch, end, h, ctx = gate_pass(tiny_vlm, editor, tiny_images, group, padding)
        for row in range(len(group)):
            pe = h[row, int(batch.prompt_end[row])]
            cos_end = F.cosine_similarity(pe, edit_end, dim=0)
            image = batch.image_mask[row].bool() & batch.attention_mask[row].bool()
            if image.any():
                chunks = h[row][image].tensor_split(IMAGE_GROUPS)  # equal counts here
                assert len({len(c) for c in chunks}) == 1
                cos_groups = torch.stack([
                    F.cosine_similarity(c.mean(dim=0), edit_groups[k], dim=0)
                    for k, c in enumerate(chunks)
                ]).mean()
                expected = (cos_end + cos_groups) / 2
            else:
                expected = cos_end / 2**0.5
            assert ctx.similarity[row].item() == pytest.approx(expected.item(), abs=1e-5)
        assert not ctx.open.any()


@pytest.mark.parametrize("padding", ["right", "left"])
def test_prompt_end_and_image_key_is_the_smaller_of_the_two_cosines(
    tiny_vlm, tiny_images, make, padding
):
    """Per input of a padded batch, the min key's similarity is the smaller of the prompt-end
    cosine and the image-mean cosine (computed here by hand); a text-only input against an
    image edit scores at most 0; the same edit given per input (the training path) scores the
    same as when looked up in the memory."""
    import torch.nn.functional as F

    editor = make(text_layer=2, visual_layer=4, gate_key="prompt_end_and_image", tau=0.999)
    add_edit(editor, tiny_images)
    same_question = Sample("green.png", RELATED.prompt, RELATED.target)
    samples = [same_question, UNRELATED, Sample(None, RELATED.prompt, RELATED.target)]
    edit = editor.memory.states([0])
    for group in (samples[:2], samples[2:]):
        batch, end, h, ctx = gate_pass(tiny_vlm, editor, tiny_images, group, padding)
        given = edit.select(torch.zeros(len(group), dtype=torch.long))
        with (
            torch.no_grad(),
            editor.session(batch.input_ids, batch.attention_mask, end, edits=given) as trained,
        ):
            tiny_vlm.backbone.forward_logits(
                tiny_vlm.model, batch.input_ids, batch.attention_mask, batch.pixel_values
            )
        torch.testing.assert_close(trained.similarity, ctx.similarity)
        for row in range(len(group)):
            pe = h[row, int(batch.prompt_end[row])]
            cos_end = F.cosine_similarity(pe, edit.keys["prompt_end"][0], dim=0)
            image = batch.image_mask[row].bool() & batch.attention_mask[row].bool()
            if image.any():
                mean = h[row][image].mean(dim=0)
                cos_image = F.cosine_similarity(mean, edit.keys["image_mean"][0], dim=0)
                expected = torch.minimum(cos_end, cos_image)
            else:
                expected = torch.minimum(cos_end, torch.tensor(0.0))
            assert ctx.similarity[row].item() == pytest.approx(expected.item(), abs=1e-5)
        assert not ctx.open.any()


@pytest.mark.parametrize("layers", [(1, 2), (2, 2)])
def test_text_keys_text_keeps_the_non_image_positions(tiny_vlm, tiny_images, make, layers):
    t, v = layers
    full = make(text_layer=t, visual_layer=v, text_keys="all")
    add_edit(full, tiny_images)
    full.detach()
    text = make(text_layer=t, visual_layer=v, text_keys="text")
    add_edit(text, tiny_images)
    batch = encode(
        [Sample(*EDIT[:2], " " + EDIT[2])], tiny_vlm.processor, tiny_vlm.backbone, tiny_images
    )
    n, n_image = int(batch.attention_mask.sum()), int(batch.image_mask.sum())
    a, b = full.edits()[0], text.edits()[0]
    assert (a.text_positions, a.visual_positions) == (n, n)
    assert (b.text_positions, b.visual_positions) == (n - n_image, n)
    hidden = tiny_vlm.backbone.hidden_size(tiny_vlm.model)
    dropped = n_image * hidden * 4 if t != v else -(n - n_image) * hidden * 4
    assert a.nbytes - b.nbytes == dropped  # with t == v the states are no longer shared
    stored = text.memory.states([0])
    kept = full.memory.states([0]).text[0][~batch.image_mask[0].bool()[:n]]
    assert torch.equal(stored.text[0], kept)
    text.detach()
    answer = make(text_layer=t, visual_layer=v, text_keys="answer")
    add_edit(answer, tiny_images)
    end = int(batch.prompt_end[0])
    assert answer.edits()[0].text_positions == n - end  # last prompt token and the target
    assert torch.equal(answer.memory.states([0]).text[0], full.memory.states([0]).text[0][end:n])


def test_applying_an_edit_stops_after_the_last_adapter_layer(tiny_vlm, tiny_images, make):
    editor = make(text_layer=1, visual_layer=2)
    layers = tiny_vlm.backbone.decoder_layers(tiny_vlm.model)
    calls = [0] * len(layers)
    handles = [
        layer.register_forward_pre_hook(
            lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1)
        )
        for i, layer in enumerate(layers)
    ]
    try:
        editor.edit_many(
            [tiny_images("red.png"), tiny_images("green.png")],
            [EDIT[1], OTHER[1]],
            [EDIT[2], OTHER[2]],
        )
        assert calls == [1, 1, 1, 0, 0, 0]  # one batched pass, nothing after layer 2
        assert len(editor.edits()) == 2
    finally:
        for handle in handles:
            handle.remove()


def test_many_edits_route_each_input_to_its_own(tiny_vlm, tiny_images, make):
    editor = make(tau=0.999)
    first = add_edit(editor, tiny_images)
    second = add_edit(editor, tiny_images, OTHER, edit_id="kite")
    queries = [Sample(OTHER[0], OTHER[1], " " + OTHER[2]), RELATED, UNRELATED]
    batch = encode(queries, tiny_vlm.processor, tiny_vlm.backbone, tiny_images)
    _, ctx = logits_of(tiny_vlm, editor, batch)
    assert [editor.memory.ids[p] for p in ctx.chosen.tolist()[:2]] == [second, first]
    assert ctx.open.tolist() == [True, True, False]
    assert [e.id for e in editor.edits()] == [first, "kite"]
    editor.remove("kite")
    _, ctx = logits_of(tiny_vlm, editor, batch)
    assert ctx.open.tolist() == [False, True, False]
    editor.restore()
    assert editor.edits() == []


def test_calls_need_a_context_and_leave_no_state(tiny_vlm, tiny_images, make):
    model, backbone = tiny_vlm.model, tiny_vlm.backbone
    editor = make()
    batch = encode([RELATED], tiny_vlm.processor, backbone, tiny_images)
    inputs = (model, batch.input_ids, batch.attention_mask, batch.pixel_values)
    with torch.no_grad():
        backbone.forward_logits(*inputs)  # no edits stored: nothing to do, no context needed
        add_edit(editor, tiny_images)
        backbone.forward_logits(*inputs)  # a plain model call opens its own context
        assert editor.hooks.hook_set.idle
        # Decoder layers run outside the model's forward have no inputs to read a context from.
        hidden = backbone.layer_input(model, 0, *inputs[1:])  # [1, seq, hidden]
        assert editor.hooks.hook_set.automatic is None  # dropped although that forward raised
        with pytest.raises(RuntimeError, match="without a call context"):
            backbone.run_layers(model, hidden, batch.attention_mask, 0, backbone.depth(model))
        with pytest.raises(ZeroDivisionError), editor.context(batch):
            raise ZeroDivisionError
        assert editor.hooks.hook_set.explicit is None
        with editor.context(batch), pytest.raises(RuntimeError, match="already open"):
            with editor.context(batch):
                pass
        with editor.disabled():
            backbone.forward_logits(*inputs)


@pytest.mark.parametrize("arch", ["llava", "blip2"])
def test_bfloat16(arch, tiny_factory, tiny_images):
    model, processor = tiny_factory(arch)
    model.to(torch.bfloat16)
    editor = DualEditor(model, processor, tau=0.999)
    assert editor.config.dtype == "bfloat16" and editor.text_adapter.dtype == torch.bfloat16
    editor.edit(tiny_images("red.png"), EDIT[1], EDIT[2])
    assert editor.memory.states([0]).text.dtype == torch.bfloat16
    batch = encode([RELATED, UNRELATED], processor, editor.backbone, tiny_images)
    inputs = (model, batch.input_ids, batch.attention_mask, batch.pixel_values)
    with torch.no_grad():
        with editor.disabled():
            base = editor.backbone.forward_logits(*inputs)
        with editor.context(batch):
            identity = editor.backbone.forward_logits(*inputs)
        randomise_outputs(editor, std=3.0)
        with editor.context(batch) as ctx:
            edited = editor.backbone.forward_logits(*inputs)
    assert base.dtype == torch.bfloat16 and torch.equal(identity, base)
    assert ctx.open.tolist() == [True, False] and torch.isfinite(edited).all()
    assert torch.equal(edited[1], base[1]) and not torch.equal(edited[0], base[0])
    editor.detach()


def test_options_are_validated(tiny_llava):
    model, processor = tiny_llava
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['tua'\\]"):
        DualEditor(model, processor, tua=0.5)
    with pytest.raises(ValueError, match="gate_scope"):
        DualEditor(model, processor, gate_scope="none")
    with pytest.raises(ValueError, match="text_layer 9 out of range"):
        DualEditor(model, processor, text_layer=9, visual_layer=9)
    with pytest.raises(ValueError, match="batch_size"):
        DualEditor(model, processor, batch_size=0)
    assert not any(
        hooks for layer in model.model.language_model.layers for hooks in [layer._forward_hooks]
    )


@pytest.mark.parametrize("start_training", [True, False])
def test_edit_runs_in_eval_mode_and_gives_the_mode_back(tiny_vlm, tiny_images, make, start_training):
    editor = make()
    layer = tiny_vlm.backbone.layer(tiny_vlm.model, 0)
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    tiny_vlm.model.train(start_training)
    try:
        add_edit(editor, tiny_images)
    finally:
        handle.remove()
        modes = {m.training for m in tiny_vlm.model.modules()}
        tiny_vlm.model.eval()  # the shared fixture's mode
    assert seen == [False]  # the capture pass ran without dropout
    assert modes == {start_training}
