"""The edited pass of training (frozen prefix once, edit states, reference and edited logits) agrees
with the editor's public path (encode_edits + session + full forward), on both tiny backbones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_train_data import write_tiny_mmedit

from dualedit.editors.dualedit import DualEditor
from dualedit.train.data import encode_edits_batch
from dualedit.editors.dualedit.losses import edit_pass, edit_states_from_prefix, prefix_layer

CONFIG = {"text_layer": 2, "visual_layer": 4, "width": 16, "heads": 2}


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    return write_tiny_mmedit(tmp_path_factory.mktemp("tiny_mmedit"), n=8)


@pytest.fixture
def setup(tiny_factory, tiny_vlm, tiny_train):
    model, processor = tiny_factory(tiny_vlm.name)
    editor = DualEditor(model, processor, **CONFIG)
    records = [tiny_train[i] for i in (1, 2, 6)]
    batch = encode_edits_batch(records, "vqa", processor, editor.backbone, tiny_train.images)
    yield editor, batch, records, tiny_train
    editor.detach()


def randomise(editor: DualEditor, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in editor.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def reference_edits(editor, records, dataset):
    images = [dataset.images.load(r.image) for r in records]
    prompts = [f"{r.src} The answer is:" for r in records]
    return editor.encode_edits(images, prompts, [r.alt for r in records])


@pytest.mark.parametrize("text_keys", ["all", "text", "answer"])
def test_edit_states_match_encode_edits(setup, text_keys):
    editor, batch, records, dataset = setup
    if text_keys != editor.config.text_keys:
        editor.detach()
        editor = DualEditor(editor.model, editor.processor, **CONFIG, text_keys=text_keys)
    images = batch.images
    with torch.no_grad(), editor.disabled():
        hidden = editor.backbone.layer_input(
            editor.model,
            prefix_layer(editor),
            images.input_ids,
            images.attention_mask,
            images.pixel_values,
        )
        ours = edit_states_from_prefix(editor, hidden, images, batch.rows("rel"))
    theirs = reference_edits(editor, records, dataset)
    assert torch.equal(ours.text_mask, theirs.text_mask)
    assert torch.equal(ours.visual_mask, theirs.visual_mask)
    mask = ours.text_mask[:, :, None]
    torch.testing.assert_close(ours.text * mask, theirs.text * mask, rtol=1e-5, atol=1e-5)
    mask = ours.visual_mask[:, :, None]
    torch.testing.assert_close(ours.visual * mask, theirs.visual * mask, rtol=1e-5, atol=1e-5)
    for kind in ("prompt_end", "last_position", "image_mean"):
        torch.testing.assert_close(ours.keys[kind], theirs.keys[kind], rtol=1e-5, atol=1e-5)
    # Text keys "text": the text states are exactly the edit's non-image positions, in order.
    image_counts = images.image_mask[batch.rows("rel")].sum(dim=1)  # [n]
    counts = images.attention_mask[batch.rows("rel")].sum(dim=1)  # [n]
    ends = images.prompt_end[batch.rows("rel")]  # [n]
    expected = {"all": counts, "text": counts - image_counts, "answer": counts - ends}[text_keys]
    assert ours.text_mask.sum(dim=1).tolist() == expected.tolist()
    assert ours.visual_mask.sum(dim=1).tolist() == counts.tolist()
    assert bool((image_counts > 0).all())


def per_row_nll(logits, batch, rows):
    out = []
    for r in range(rows.start, rows.stop):
        mask = batch.target_mask[r]
        out.append(F.cross_entropy(logits[r][mask], batch.target_ids[r][mask]))
    return torch.stack(out)


def test_edit_pass_matches_full_forward_with_edits(setup):
    """Loss terms equal those from the editor's public path: encode_edits, then a full forward
    of every sample inside `session(edits=..., gate=False)`."""
    editor, batch, records, dataset = setup
    randomise(editor)
    out = edit_pass(editor, batch)
    images, text, n = batch.images, batch.text, batch.n
    edits = reference_edits(editor, records, dataset)
    with torch.no_grad():
        with editor.session(
            images.input_ids,
            images.attention_mask,
            images.prompt_end,
            edits=edits.select(torch.arange(n).repeat(4)),
            gate=False,
        ):
            edited = editor.backbone.forward_logits(
                editor.model, images.input_ids, images.attention_mask, images.pixel_values
            )
        with editor.disabled():
            plain = editor.backbone.forward_logits(
                editor.model, images.input_ids, images.attention_mask, images.pixel_values
            )
            plain_text = editor.backbone.forward_logits(
                editor.model, text.input_ids, text.attention_mask
            )
        with editor.session(
            text.input_ids, text.attention_mask, text.prompt_end, edits=edits, gate=False
        ):
            edited_text = editor.backbone.forward_logits(
                editor.model, text.input_ids, text.attention_mask
            )
    for key in ("rel", "t_gen", "v_gen"):
        expected = per_row_nll(edited, images, batch.rows(key))
        torch.testing.assert_close(out.nll[key], expected, rtol=1e-4, atol=1e-5)
    loc = batch.rows("m_loc")
    for name, (ref, new, b, rows) in {
        "m_loc": (plain, edited, images, loc),
        "t_loc": (plain_text, edited_text, text, slice(0, n)),
    }.items():
        kl = []
        for r in range(rows.start, rows.stop):
            m = b.target_mask[r]
            p = F.log_softmax(ref[r][m], -1)
            q = F.log_softmax(new[r][m], -1)
            kl.append((p.exp() * (p - q)).sum(-1).mean())
        torch.testing.assert_close(out.kl[name], torch.stack(kl), rtol=1e-4, atol=1e-6)
        assert (out.kl[name] > 1e-4).all()  # the randomised adapters do change the outputs
    loss, terms = out.loss(text_loc_kl=True)
    torch.testing.assert_close(
        loss, terms["l_rel"] + terms["l_gen"] + terms["l_loc"], rtol=0, atol=0
    )
    _, terms_no_text = out.loss(text_loc_kl=False)
    torch.testing.assert_close(
        terms["l_loc"] - terms_no_text["l_loc"], out.kl["t_loc"].mean(), rtol=1e-6, atol=1e-7
    )


def test_identity_at_init_and_gradients_reach_only_adapters(setup):
    editor, batch, _, _ = setup
    out = edit_pass(editor, batch)
    for key in ("m_loc", "t_loc"):
        assert out.kl[key].abs().max() < 1e-6
        assert torch.equal(out.agreement[key], torch.ones(batch.n, dtype=torch.float64))
    loss, _ = out.loss()
    loss.backward()
    grads = {name: p.grad for name, p in editor.adapters.named_parameters()}
    # Zero-initialised output projections: only they get a gradient at the first step.
    assert grads["text.out.weight"].abs().sum() > 0 and grads["visual.out.weight"].abs().sum() > 0
    assert all(p.grad is None for p in editor.model.parameters())


def test_prefix_runs_once_without_graph(setup):
    """The vision side and the layers below m run once per batch kind and build no graph."""
    editor, batch, _, _ = setup
    randomise(editor)
    backbone, model = editor.backbone, editor.model
    calls = {"vision": 0, "first": 0, "m": 0}
    grad_at_m = []

    def count(name):
        def hook(module, args, output):
            calls[name] += 1
            if name == "m":
                grad_at_m.append(args[0].requires_grad)

        return hook

    m = prefix_layer(editor)
    handles = [
        backbone.vision_modules(model)[0].register_forward_hook(count("vision")),
        backbone.layer(model, 0).register_forward_hook(count("first")),
        backbone.layer(model, m).register_forward_hook(count("m")),
    ]
    try:
        edit_pass(editor, batch)
    finally:
        for handle in handles:
            handle.remove()
    assert calls["vision"] == 1  # all image samples in one prefix pass
    assert calls["first"] == 2  # image batch and text batch
    # layer m: edit states, m_loc reference, edited image pass, text reference, edited text pass
    assert calls["m"] == 5
    assert not any(grad_at_m)  # its input never carries a graph
