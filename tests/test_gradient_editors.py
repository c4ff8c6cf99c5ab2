"""The gradient-based editors (MEND, KE) and their shared machinery, on both tiny backbones: the
traced gradient factors are the weight gradient, per-row low-rank updates are the dense update,
the training pass computes what an applied edit does, and training runs and learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_train_data import write_tiny_mmedit

from dualedit.data.prompts import encode, record_samples
from dualedit.data.requests import EditRequest
from dualedit.editors import get_method, load_editor
from dualedit.editors.capture import LinearTrace
from dualedit.data.prompts import select_rows
from dualedit.editors.gradient.editor import row_nll
from dualedit.editors.gradient.train import GradientTrainable, gradient_pass
from dualedit.editors.ke import KnowledgeEditor
from dualedit.editors.lowrank import Factors, RowUpdates
from dualedit.editors.mend import MENDEditor
from dualedit.train import TrainSettings
from dualedit.train.data import encode_edits_batch


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    return write_tiny_mmedit(tmp_path_factory.mktemp("tiny_grad"), n=12)


def randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def rel_batch(tiny_train, processor, backbone, indices=(0, 1, 2)):
    samples = [record_samples(tiny_train[i], "vqa")["rel"] for i in indices]
    return encode(samples, processor, backbone, tiny_train.images)


@pytest.mark.parametrize("cls", [MENDEditor, KnowledgeEditor])
def test_traced_factors_give_the_weight_gradient(cls, tiny_vlm, tiny_factory, tiny_train):
    model, processor = tiny_factory(tiny_vlm.name)
    editor = cls(model, processor)
    batch = rel_batch(tiny_train, processor, editor.backbone)
    inputs, grads = editor.edit_gradients(batch)
    for name, linear in editor.targets.items():
        linear.weight.requires_grad_(True)
    logits = editor.backbone.forward_logits(
        model, batch.input_ids, batch.attention_mask, batch.pixel_values
    )
    loss = row_nll(logits[batch.target_mask], batch)
    loss.backward()
    for name, linear in editor.targets.items():
        from_factors = torch.einsum("nso,nsi->oi", grads[name], inputs[name])  # [d_out, d_in]
        torch.testing.assert_close(from_factors, linear.weight.grad, atol=1e-6, rtol=1e-4)
        assert linear.weight.grad.abs().sum() > 0


def test_linear_trace_needs_grad_mode(tiny_vlm):
    linear = tiny_vlm.backbone.mlp_out(tiny_vlm.model, 0)
    with LinearTrace({"out": linear}), torch.no_grad(), pytest.raises(RuntimeError, match="grad"):
        linear(torch.zeros(1, 2, linear.in_features))


def test_row_updates_equal_the_dense_update_per_row(tiny_vlm, tiny_factory, tiny_train):
    model, processor = tiny_factory(tiny_vlm.name)
    backbone = tiny_vlm.backbone
    linear = backbone.mlp_out(model, 1)
    gen = torch.Generator().manual_seed(3)
    factors = Factors(
        torch.randn(2, 5, linear.in_features, generator=gen) * 0.05,
        torch.randn(2, 5, linear.out_features, generator=gen) * 0.05,
    )
    batch = rel_batch(tiny_train, processor, backbone, indices=(0, 1))
    updates = RowUpdates({"out": linear})
    with torch.no_grad():
        with updates.applied({"out": factors}):
            together = backbone.forward_logits(
                model, batch.input_ids, batch.attention_mask, batch.pixel_values
            )
        for row in range(2):
            original = linear.weight.detach().clone()
            linear.weight.add_(factors.select(torch.tensor([row])).dense())
            alone = backbone.forward_logits(
                model, batch.input_ids, batch.attention_mask, batch.pixel_values
            )
            linear.weight.copy_(original)
            torch.testing.assert_close(together[row], alone[row], atol=1e-4, rtol=1e-4)
    assert not updates._hooks.attached  # the hooks live only inside the block


@pytest.mark.parametrize("cls", [MENDEditor, KnowledgeEditor])
def test_training_pass_computes_what_an_applied_edit_does(cls, tiny_vlm, tiny_factory, tiny_train):
    """The rel NLL of edit i in the training pass equals the NLL of its edit sample after
    `apply` of that edit alone: training optimises the editor the harness evaluates."""
    model, processor = tiny_factory(tiny_vlm.name)
    editor = cls(model, processor)
    randomise(editor.network, scale=0.05)
    if cls is MENDEditor:
        with torch.no_grad():
            editor.network.edit_lrs.fill_(1.0)  # an update large enough to move the NLL
    records = [tiny_train[i] for i in (0, 3)]
    batch = encode_edits_batch(records, "vqa", processor, editor.backbone, tiny_train.images)
    editor.network.eval()
    with torch.no_grad():
        out = gradient_pass(editor, batch)
    for i, record in enumerate(records):
        sample = record_samples(record, "vqa")["rel"]
        editor.apply([EditRequest(sample.image, sample.prompt, sample.target)], tiny_train.images)
        alone = encode([sample], processor, editor.backbone, tiny_train.images)
        with torch.no_grad():
            logits = editor.logits(alone)[alone.target_mask]
        nll = F.cross_entropy(logits, alone.target_ids[alone.target_mask])
        torch.testing.assert_close(out.nll["rel"][i], nll, atol=2e-4, rtol=1e-3)
        editor.restore()
    assert out.nll["rel"].std() > 0 or out.nll["rel"].numel() == 1


def test_mend_starts_as_the_identity_on_normalised_factors(tiny_vlm, tiny_factory, tiny_train):
    model, processor = tiny_factory(tiny_vlm.name)
    editor = MENDEditor(model, processor)
    net = editor.network
    transform = net.transforms[0]
    transform.eval()
    d_out = transform.norm_delta.mean.numel()
    x, delta = torch.randn(7, transform.d_in), torch.randn(7, d_out)
    x_t, delta_t = transform(x, delta, 0)
    torch.testing.assert_close(x_t, x / (1 + 1e-7))
    torch.testing.assert_close(delta_t, delta / (1 + 1e-7))
    transform.train()
    with torch.enable_grad():
        transform(x * 3 + 1, delta, 0)
    torch.testing.assert_close(transform.norm_x.mean, (x * 3 + 1).mean(0))
    assert int(transform.norm_x.count) == 7


def test_ke_update_is_its_formula_on_the_dense_gradient(tiny_vlm, tiny_factory, tiny_train):
    model, processor = tiny_factory(tiny_vlm.name)
    editor = KnowledgeEditor(model, processor, condition_width=32, hidden=16, max_scale=0.5)
    randomise(editor.network, scale=0.1)
    batch = rel_batch(tiny_train, processor, editor.backbone, indices=(4,))
    inputs, grads = editor.edit_gradients(batch)
    with torch.no_grad():
        factors = editor.transform(inputs, grads, batch.attention_mask.bool(), batch)
        condition = editor.condition(batch)
        for name, update in zip(editor.network.names, editor.network.updates):
            a_row, a_col, b_row, b_col, eta = update(condition)
            grad = torch.einsum("so,si->oi", grads[name][0], inputs[name][0])  # [d_out, d_in]
            alpha, beta = a_row[0][:, None] * a_col[0][None], b_row[0][:, None] * b_col[0][None]
            expected = 0.5 * torch.sigmoid(eta[0]) * (alpha * grad + beta)
            torch.testing.assert_close(factors[name].dense(), expected, atol=1e-7, rtol=1e-4)


def test_ke_multiplier_rises_while_the_kl_exceeds_the_margin(tiny_vlm, tiny_factory, tiny_train):
    model, processor = tiny_factory(tiny_vlm.name)
    editor = KnowledgeEditor(model, processor, condition_width=32, hidden=16, margin=1e-6)
    randomise(editor.network, scale=0.3)
    batch = encode_edits_batch(
        [tiny_train[i] for i in (0, 1)], "vqa", processor, editor.backbone, tiny_train.images
    )
    loss, terms = editor.objective(gradient_pass(editor, batch))
    assert terms["l_loc"] > 1e-6
    loss.backward()
    assert editor.network.raw_multiplier.grad < 0  # Adam's descent step raises it


@pytest.mark.parametrize("cls", [MENDEditor, KnowledgeEditor])
def test_training_lowers_the_loss_and_saves_a_loadable_editor(
    cls, tiny_vlm, tiny_factory, tiny_train, tmp_path
):
    model, processor = tiny_factory(tiny_vlm.name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    options = {"rank": 32} if cls is MENDEditor else {"condition_width": 32, "hidden": 16}
    trainable = GradientTrainable(cls(model, processor, **options))
    batch = encode_edits_batch(
        [tiny_train[i] for i in range(4)], "vqa", processor, trainable.editor.backbone,
        tiny_train.images,
    )
    optimizer = torch.optim.Adam(trainable.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, _ = trainable.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    trainable.close()
    assert losses[-1] < losses[0]
    assert [p.requires_grad for p in model.parameters()] == flags  # given back
    result = get_method(cls.name).train(
        model, processor, tiny_train, config=options, out_dir=tmp_path / "run", progress=False,
        settings=TrainSettings(max_steps=4, batch_size=2, eval_every=2, val_edits=4,
                               checkpoint_every=2),
    )
    loaded = load_editor(model, processor, result.best_dir)
    assert type(loaded) is cls and loaded.config_dict()["layers"] == list(loaded.layers)
    sample = record_samples(tiny_train[0], "vqa")["rel"]
    loaded.apply([EditRequest(sample.image, sample.prompt, sample.target)], tiny_train.images)
    loaded.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unknown_map_names_and_layers_are_refused(tiny_vlm):
    with pytest.raises(ValueError, match="not MLP maps"):
        MENDEditor(tiny_vlm.model, tiny_vlm.processor, weights=("nope",))
    with pytest.raises(ValueError, match="out of range"):
        KnowledgeEditor(tiny_vlm.model, tiny_vlm.processor, layers=(99,))
    with pytest.raises(ValueError, match="layers"):
        MENDEditor(tiny_vlm.model, tiny_vlm.processor, layers=("a",))


def test_select_rows_keeps_every_field(tiny_vlm, tiny_train):
    batch = rel_batch(tiny_train, tiny_vlm.processor, tiny_vlm.backbone)
    one = select_rows(batch, slice(1, 2))
    assert one.input_ids.shape[0] == 1 and one.pixel_values.shape[0] == 1
    assert torch.equal(one.target_ids[0], batch.target_ids[1])
