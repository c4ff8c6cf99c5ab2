"""SERAC: the editor contract on both tiny backbones (trained tensors drawn at random, as
test_contract does), the truncated counterfactual model, the classifier's loss, and training
with the shared loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_contract import REQUESTS, same_state, state_bytes
from test_train_data import write_tiny_mmedit

from dualedit.data.prompts import Sample, encode, encode_prompts
from dualedit.editors.serac import SERACEditor, SERACTrainable, balanced_bce, train_serac
from dualedit.editors.serac.scope import log_out_of_scope
from dualedit.train.data import encode_edits_batch
from dualedit.train.losses import METRICS
from dualedit.train.settings import TrainSettings

#: Small enough to keep the file fast; the contract holds for any size.
OPTIONS = {"scope_width": 32}


def serac_editor(model, processor, **options) -> SERACEditor:
    """A SERAC editor whose trained tensors are drawn at random (std 0.3), as if trained."""
    editor = SERACEditor(model, processor, **{**OPTIONS, **options})
    generator = torch.Generator().manual_seed(0)
    drawn = {
        k: (torch.randn(t.shape, generator=generator) * 0.3).to(t.dtype)
        for k, t in editor.state_tensors().items()
    }
    editor.load_state(editor.folder_meta(), drawn, "test")
    now = editor.state_tensors()
    assert all(torch.equal(now[k], drawn[k]) for k in drawn)
    return editor


@pytest.fixture
def setup(tiny_vlm, tiny_factory):
    model, processor = tiny_factory(tiny_vlm.name)
    editor = serac_editor(model, processor)
    yield editor, model, processor, editor.backbone
    editor.detach()


def edit_batch(processor, backbone, images, requests=REQUESTS):
    return encode([r.sample() for r in requests], processor, backbone, images)


def test_restore_is_byte_identical_and_flags_kept(tiny_vlm, tiny_factory, tiny_images):
    model, processor = tiny_factory(tiny_vlm.name)
    before = state_bytes(model)
    flags = [p.requires_grad for p in model.parameters()]
    editor = serac_editor(model, processor)  # random counterfactual weights: a copy's, not these
    editor.apply(REQUESTS[:2], tiny_images)
    editor.apply(REQUESTS[2:], tiny_images)
    editor.restore()
    editor.detach()
    assert same_state(model, before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert editor.edits() == []


def test_edits_route_in_scope_rows_and_leave_the_rest_exactly(setup, tiny_images):
    editor, _, processor, backbone = setup
    batch = edit_batch(processor, backbone, tiny_images)
    with torch.no_grad():
        base = editor.logits(batch)  # [3, seq, vocab]
        first = editor.apply(REQUESTS[:1], tiny_images)
        second = editor.apply(REQUESTS[1:2], tiny_images)
        assert [info.id for info in editor.edits()] == first + second == [0, 1]
        assert [info.target for info in editor.edits()] == ["blue", "star"]
        positions, probability = editor.route(batch)
        routed = probability > editor.config.threshold
        assert routed.tolist() == [True, True, False]  # the third question was not edited
        assert positions[:2].tolist() == [0, 1]  # each edited question finds its own edit
        edited = editor.logits(batch)
        with editor.disabled():
            assert editor.route(batch) is None
            assert torch.equal(editor.logits(batch), base)
        out_of_scope = edit_batch(processor, backbone, tiny_images, REQUESTS[2:])
        plain = backbone.forward_logits(
            editor.model, out_of_scope.input_ids, out_of_scope.attention_mask,
            out_of_scope.pixel_values,
        )
        assert torch.equal(editor.logits(out_of_scope), plain)  # exactly the base model's
    for row in (0, 1):
        assert not torch.allclose(edited[row], base[row])
    torch.testing.assert_close(edited[2], base[2], atol=1e-5, rtol=0)
    decision = editor.explain(tiny_images("red.png"), REQUESTS[0].prompt)
    assert decision.edit_id == 0 and decision.routed and decision.probability > 0.5
    away = editor.explain(None, "nq question: who was the leader of the country?")
    assert not away.routed and away.probability < editor.config.threshold


def test_save_and_load_give_identical_outputs(setup, tiny_images, tmp_path):
    editor, model, processor, backbone = setup
    editor.apply(REQUESTS[:2], tiny_images, ids=["a", "b"])
    batch = edit_batch(processor, backbone, tiny_images)
    with torch.no_grad():
        saved_logits = editor.logits(batch)
    editor.save_pretrained(tmp_path / "editor")
    meta = json.loads((tmp_path / "editor" / "adapter_config.json").read_text())
    assert meta["method"] == "serac" and "memory.json" in meta["files"]
    assert meta["config"]["scope_layer"] == 3 and meta["config"]["counterfactual_layers"] == 6
    names = set(editor.state_tensors())
    assert any(n.startswith("scope.") for n in names)
    assert not any(v in n for n in names for v in ("vision", "qformer", "projector", "query_tok"))
    editor.restore()
    before = state_bytes(model)
    loaded = SERACEditor.from_pretrained(model, processor, tmp_path / "editor")
    assert [info.id for info in loaded.edits()] == ["a", "b"]
    with torch.no_grad():
        assert torch.equal(loaded.logits(batch), saved_logits)
    loaded.restore()
    assert same_state(model, before)


def test_load_state_is_strict(setup):
    editor = setup[0]
    tensors = dict(editor.state_tensors())
    name = "scope.mlp.0.weight"
    with pytest.raises(ValueError, match="missing keys \\['scope.mlp.0.weight'\\]"):
        editor.load_state({}, {k: v for k, v in tensors.items() if k != name}, "here")
    with pytest.raises(ValueError, match="scope.mlp.0.weight has shape"):
        editor.load_state({}, {**tensors, name: torch.zeros(2, 2)}, "here")
    with pytest.raises(ValueError, match="unexpected keys \\['counterfactual.extra'\\]"):
        editor.load_state({}, {**tensors, "counterfactual.extra": torch.zeros(1)}, "here")


def test_logits_are_aligned_to_the_batch(setup, tiny_images):
    editor, _, processor, backbone = setup
    editor.apply(REQUESTS[:1], tiny_images)
    batch = edit_batch(processor, backbone, tiny_images)
    with torch.no_grad():
        together = editor.logits(batch)
        assert together.shape[:2] == batch.input_ids.shape
        for row, request in enumerate(REQUESTS):
            alone = editor.logits(encode([request.sample()], processor, backbone, tiny_images))
            n = int(batch.attention_mask[row].sum())
            torch.testing.assert_close(together[row, :n], alone[0, :n], atol=1e-4, rtol=1e-4)


def test_generate_with_a_kv_cache_matches_and_merges_rows(setup, tiny_images):
    editor, _, processor, backbone = setup
    editor.apply(REQUESTS[:1], tiny_images)
    prompts = [Sample(r.image, r.prompt, "") for r in REQUESTS]
    batch = encode_prompts(prompts, processor, backbone, tiny_images)
    greedy = {"do_sample": False, "num_beams": 1, "max_new_tokens": 3, "min_new_tokens": 3,
              "pad_token_id": processor.tokenizer.pad_token_id}
    with torch.no_grad():
        cached = editor.generate(batch, use_cache=True, **greedy)  # [3, 3]
        uncached = editor.generate(batch, use_cache=False, **greedy)
        with editor.disabled():
            base = editor.generate(batch, **greedy)
        alone = editor.generate(
            encode_prompts(prompts[2:], processor, backbone, tiny_images), **greedy
        )
    assert cached.shape == (3, 3) and torch.equal(cached, uncached)
    routed = editor.route(batch)[1] > editor.config.threshold
    assert routed.tolist() == [True, False, False]
    assert not torch.equal(cached[0], base[0])  # the counterfactual model answered
    assert torch.equal(cached[2], alone[0]) and torch.equal(cached[1:], base[1:])


def test_remove_forgets_one_edit(setup, tiny_images):
    editor, _, processor, backbone = setup
    ids = editor.apply(REQUESTS[:2], tiny_images)
    batch = edit_batch(processor, backbone, tiny_images, REQUESTS[:1])
    editor.remove(ids[0])
    assert [info.id for info in editor.edits()] == ids[1:]
    assert editor.explain(tiny_images("red.png"), REQUESTS[0].prompt).edit_id == ids[1]
    with pytest.raises(KeyError):
        editor.remove(ids[0])
    with pytest.raises(ValueError, match="already in the store"):
        editor.apply(REQUESTS[:1], tiny_images, ids=[ids[1]])
    editor.remove(ids[1])
    with torch.no_grad(), editor.disabled():
        base = editor.logits(batch)
    assert torch.equal(editor.logits(batch), base)


def test_options_are_checked(tiny_vlm):
    model, processor = tiny_vlm.model, tiny_vlm.processor
    with pytest.raises(ValueError, match="no_such_option"):
        SERACEditor(model, processor, no_such_option=1)
    for bad, match in [({"threshold": 1.0}, "threshold"), ({"template": "x"}, "template"),
                       ({"scope_layer": 6}, "scope_layer"), ({"counterfactual_layers": 7},
                       "counterfactual_layers"), ({"edit_weight": 0, "scope_weight": 0}, "both")]:
        with pytest.raises(ValueError, match=match):
            SERACEditor(model, processor, **bad)


def test_the_counterfactual_model_is_truncated_and_generates(tiny_vlm, tiny_images):
    model, processor, backbone = tiny_vlm.model, tiny_vlm.processor, tiny_vlm.backbone
    before = state_bytes(model)
    editor = SERACEditor(model, processor, counterfactual_layers=2, **OPTIONS)
    cf = editor.counterfactual
    assert backbone.depth(cf) == 2 and backbone.depth(model) == 6
    assert cf.config.get_text_config().num_hidden_layers == 2
    assert model.config.get_text_config().num_hidden_layers == 6
    # The vision side is the base's own modules; the language side a copy of the base's weights.
    for mine, base in zip(backbone.vision_modules(cf), backbone.vision_modules(model)):
        assert mine is base
    assert torch.equal(backbone.layer(cf, 1).state_dict()["self_attn.q_proj.weight"],
                       backbone.layer(model, 1).state_dict()["self_attn.q_proj.weight"])
    assert backbone.layer(cf, 1) is not backbone.layer(model, 1)
    editor.apply(REQUESTS[:1], tiny_images)
    batch = encode_prompts([Sample(REQUESTS[0].image, REQUESTS[0].prompt, "")], processor,
                           backbone, tiny_images)
    facts = [editor.store.info(0)["fact"]]
    prefixed = editor.prefixed(batch, facts).batch
    greedy = {"do_sample": False, "num_beams": 1, "max_new_tokens": 3, "min_new_tokens": 3,
              "pad_token_id": processor.tokenizer.pad_token_id}
    with torch.no_grad():
        args = (cf, prefixed.input_ids, prefixed.attention_mask, prefixed.pixel_values)
        cached = backbone.generate(*args, use_cache=True, **greedy)
        uncached = backbone.generate(*args, use_cache=False, **greedy)
    assert cached.shape == (1, 3) and torch.equal(cached, uncached)
    tokens = processor.tokenizer.convert_ids_to_tokens(facts[0])
    assert tokens[-1] == "blue" and tokens[0] == "what"  # the edit's "prompt target"
    assert same_state(model, before)


def test_balanced_bce_is_serac_s():
    d2 = torch.tensor([[0.1, 2.0], [3.0, 0.2]])
    positive = torch.eye(2, dtype=torch.bool)
    expected = (0.1 + 0.2) / 2 - (math.log(1 - math.exp(-2.0)) + math.log(1 - math.exp(-3.0))) / 2
    assert balanced_bce(d2, positive).item() == pytest.approx(expected, rel=1e-6)
    grid = torch.tensor([1e-3, 0.3, 0.69, 0.7, 2.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(log_out_of_scope(grid), torch.log(1 - torch.exp(-grid)))
    assert torch.isfinite(log_out_of_scope(torch.tensor([0.0, 200.0]))).all()
    with pytest.raises(ValueError, match="in-scope and out-of-scope"):
        balanced_bce(d2, torch.ones(2, 2, dtype=torch.bool))


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    return write_tiny_mmedit(tmp_path_factory.mktemp("serac_mmedit"), n=12)


def test_training_steps_lower_both_losses_on_a_fixed_batch(tiny_vlm, tiny_factory, tiny_train):
    model, processor = tiny_factory(tiny_vlm.name)
    flags = [p.requires_grad for p in model.parameters()]
    trainable = SERACTrainable(model, processor, config={**OPTIONS, "counterfactual_layers": 2})
    batch = encode_edits_batch(
        [tiny_train[i] for i in range(4)], "vqa", processor, trainable.editor.backbone,
        tiny_train.images,
    )
    optimizer = torch.optim.Adam([
        {"params": trainable.editor.classifier.parameters(), "lr": 1e-2},
        {"params": trainable.editor.language.parameters(), "lr": 3e-3},
    ])
    terms = []
    for _ in range(20):
        loss, parts = trainable.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        terms.append({k: float(v.detach()) for k, v in parts.items()})
    assert terms[-1]["l_cls"] < 0.5 * terms[0]["l_cls"]
    assert terms[-1]["l_cntr"] < 0.5 * terms[0]["l_cntr"]
    with torch.no_grad():
        p = torch.exp(-trainable.scope_distances(batch))  # [5n, n]
        positive = trainable.in_scope_pairs(batch, p.device)
        metrics = trainable.metrics(batch)
    # The classifier learned to tell its in-scope pairs from the others (20 steps: not all).
    assert positive.sum() == 12 and p[positive].mean() > 2 * p[~positive].mean()
    assert list(metrics) == list(METRICS)
    assert all(bool(((v >= 0) & (v <= 1)).all()) and v.shape == (4,) for v in metrics.values())
    trainable.close()
    assert [p.requires_grad for p in model.parameters()] == flags


def test_metrics_without_routing_are_the_base_model(tiny_vlm, tiny_factory, tiny_train):
    model, processor = tiny_factory(tiny_vlm.name)
    trainable = SERACTrainable(model, processor, config={**OPTIONS, "threshold": 1 - 1e-9})
    batch = encode_edits_batch(
        [tiny_train[i] for i in range(3)], "vqa", processor, trainable.editor.backbone,
        tiny_train.images,
    )
    with torch.no_grad():
        metrics = trainable.metrics(batch)
    assert all(metrics[key].tolist() == [1.0] * 3 for key in ("t_loc", "m_loc"))
    trainable.close()


def test_train_serac_writes_a_loadable_best_folder(tiny_vlm, tiny_factory, tiny_train, tmp_path,
                                                   tiny_images):
    model, processor = tiny_factory(tiny_vlm.name)
    before = state_bytes(model)
    flags = [p.requires_grad for p in model.parameters()]
    settings = TrainSettings(lr=1e-3, batch_size=4, max_steps=2, eval_every=2, val_edits=4,
                             checkpoint_every=2, log_every=1, patience=None)
    result = train_serac(
        model, processor, tiny_train, config={**OPTIONS, "counterfactual_layers": 3},
        settings=settings, out_dir=tmp_path / "run", progress=False, calibrate_tau=True,
    )
    assert result.steps == 2 and result.best_dir is not None and result.finish is None
    assert same_state(model, before)
    assert [p.requires_grad for p in model.parameters()] == flags
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert any(e.get("kind") == "eval" and "rel" in e for e in log["entries"])
    editor = SERACEditor.from_pretrained(model, processor, result.best_dir)
    assert editor.config.counterfactual_layers == 3 and editor.edits() == []
    assert editor.backbone.depth(editor.counterfactual) == 3
    editor.apply(REQUESTS[:1], tiny_images)
    with torch.no_grad():
        logits = editor.logits(edit_batch(processor, editor.backbone, tiny_images))
    assert torch.isfinite(logits).all()
