"""LTE: a LoRA through forward hooks (identity at init, the model's state untouched, the same as
PEFT's), the nearest stored fact read before each question, the editor contract's properties
with random LoRA tensors, and training through the shared loop."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_data import write_tiny_mmedit

from dualedit.data.prompts import Sample, encode, encode_prompts
from dualedit.data.requests import EditRequest
from dualedit.editors.lte import TEMPLATES, LTEConfig, LTEditor, LTETrainable, export_peft
from dualedit.editors.lte.lora import layer_children
from dualedit.editors.lte.method import METHOD
from dualedit.editors.lte.train import edit_pass, train_lte
from dualedit.editors.retrieval import LexicalIndex
from dualedit.train.data import encode_edits_batch
from dualedit.train.settings import TrainSettings

ALL_TARGETS = ("q", "k", "v", "o", "mlp")
REQUESTS = [
    EditRequest("red.png", "what color is the ball? the answer is:", "blue"),
    EditRequest("blue.png", "what shape is the kite? the answer is:", "star"),
    EditRequest("green.png", "how many dogs are there? the answer is:", "3"),
]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).clone()


def state_bytes(model) -> dict[str, torch.Tensor]:
    return {k: as_bytes(v) for k, v in model.state_dict().items()}


def same_state(model, saved) -> bool:
    now = state_bytes(model)
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


def random_editor(model, processor, **options) -> LTEditor:
    """An editor whose LoRA tensors are drawn at random (std 0.3), as the contract test does."""
    editor = LTEditor(model, processor, lora_targets=ALL_TARGETS, **options)
    generator = torch.Generator().manual_seed(0)
    drawn = {
        k: torch.randn(t.shape, generator=generator) * 0.3
        for k, t in editor.state_tensors().items()
    }
    editor.load_state(editor.folder_meta(), drawn, "test")
    assert all(torch.equal(editor.state_tensors()[k], drawn[k]) for k in drawn)
    return editor


def batch_of(editor, images, requests=REQUESTS):
    return encode([r.sample() for r in requests], editor.processor, editor.backbone, images)


def plain_logits(editor, batch):
    return editor.backbone.forward_logits(
        editor.model, batch.input_ids, batch.attention_mask, batch.pixel_values
    )


@pytest.fixture(params=["llava", "blip2"])
def fresh(request, tiny_factory):
    """(name, model, processor) of a fresh tiny model."""
    model, processor = tiny_factory(request.param)
    return request.param, model, processor


# -- the LoRA --------------------------------------------------------------------------------------


def test_lora_is_the_identity_at_init_and_leaves_the_model_alone(fresh, tiny_images):
    name, model, processor = fresh
    before = state_bytes(model)
    model.requires_grad_(True)
    model.get_input_embeddings().weight.requires_grad_(False)  # a mixed set of flags
    flags = [p.requires_grad for p in model.parameters()]
    editor = LTEditor(model, processor, lora_targets=ALL_TARGETS)
    batch = batch_of(editor, tiny_images)
    with torch.no_grad():
        with editor.disabled():
            base = plain_logits(editor, batch)
        with editor.lora_forced():
            init = plain_logits(editor, batch)
    assert torch.equal(init, base)  # B = 0
    # Only the decoder layers' maps, none of the vision side.
    assert all(".layers." in p and "vision" not in p and "qformer" not in p
               for p in editor.lora.paths)
    assert len(editor.lora.paths) == 6 * len(layer_children(model.config.model_type, ALL_TARGETS))
    assert not any(p.requires_grad for p in model.parameters())  # frozen while attached
    assert all(p.requires_grad for p in editor.parameters())
    editor.load_state(editor.folder_meta(), {
        k: torch.randn(t.shape) * 0.3 for k, t in editor.state_tensors().items()
    }, "test")
    with torch.no_grad(), editor.lora_forced():
        changed = plain_logits(editor, batch)
    assert not torch.allclose(changed, base)
    assert same_state(model, before)  # the LoRA lives in hooks, not in the model's tensors
    editor.detach()
    assert same_state(model, before)
    assert [p.requires_grad for p in model.parameters()] == flags
    with torch.no_grad(), editor.lora_forced():
        assert torch.equal(plain_logits(editor, batch), base)  # no hooks left


def test_export_peft_gives_the_same_logits_as_the_hooks(fresh, tiny_factory, tiny_images, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    name, model, processor = fresh
    editor = random_editor(model, processor, lora_alpha=8.0)
    editor.save_pretrained(tmp_path / "editor")
    batch = batch_of(editor, tiny_images)
    with torch.no_grad(), editor.lora_forced():
        ours = plain_logits(editor, batch)
    for source, out in ((editor, "peft_a"), (tmp_path / "editor", "peft_b")):
        export_peft(source, tmp_path / out)
        peft_config = json.loads((tmp_path / out / "adapter_config.json").read_text())
        assert peft_config["r"] == editor.config.lora_r and peft_config["lora_alpha"] == 8.0
        assert sorted(peft_config["target_modules"]) == sorted(editor.lora.paths)
        base, _ = tiny_factory(name)  # the unchanged base checkpoint
        peft_model = PeftModel.from_pretrained(base, tmp_path / out).eval()
        with torch.no_grad():
            theirs = peft_model(**batch.model_inputs()).logits
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    editor.detach()


# -- retrieval and config --------------------------------------------------------------------------


def test_lexical_index_scores_and_nearest():
    index = LexicalIndex([[1, 2, 3], [4, 5], [1, 4]])
    scores = index.scores([4, 5])
    assert scores[1] == pytest.approx(1.0) and scores[0] == 0.0 and 0 < scores[2] < 1
    assert index.nearest([4, 5], 2) == [1, 2]
    assert index.best([1, 2]) == (0, pytest.approx(max(index.scores([1, 2]))))


def test_config_is_validated_and_saved_as_json():
    config = LTEConfig(lora_targets=["q", "o"], lora_layers=[4, 5])
    assert config.lora_targets == ("q", "o") and config.lora_layers == (4, 5)
    assert config.to_dict()["lora_targets"] == ["q", "o"]
    for bad in ({"lora_targets": ("q", "x")}, {"lora_targets": ()}, {"lora_r": 0},
                {"threshold": 1.5}, {"lora_dropout": 1.0}, {"template": "nope"},
                {"lora_layers": [-1]}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LTEConfig(**bad)


def test_bad_layers_are_refused_by_name(tiny_vlm):
    with pytest.raises(ValueError, match="layer 9 out of range"):
        LTEditor(tiny_vlm.model, tiny_vlm.processor, lora_layers=(9,))


# -- the editor contract --------------------------------------------------------------------------


def test_restore_is_byte_identical_and_disabled_is_the_base(fresh, tiny_images):
    _, model, processor = fresh
    before = state_bytes(model)
    flags = [p.requires_grad for p in model.parameters()]
    editor = random_editor(model, processor)
    assert editor.template == "plain"  # the small models' default
    batch = batch_of(editor, tiny_images)
    with torch.no_grad():
        base = editor.logits(batch)  # no edit held: the base model
        first = editor.apply(REQUESTS[:1], tiny_images)
        second = editor.apply(REQUESTS[1:2], tiny_images)
        edited = editor.logits(batch)
        with editor.disabled():
            unedited = editor.logits(batch)
    assert [e.id for e in editor.edits()] == first + second
    assert torch.equal(unedited, base)
    assert not torch.allclose(edited[:2], base[:2])
    editor.restore()
    with torch.no_grad():
        assert torch.equal(editor.logits(batch), base)  # the LoRA stays, but acts on edits only
    editor.detach()
    assert same_state(model, before) and editor.edits() == []
    assert [p.requires_grad for p in model.parameters()] == flags


def test_each_question_reads_its_nearest_fact(fresh, tiny_images):
    _, model, processor = fresh
    editor = random_editor(model, processor)
    editor.apply(REQUESTS[:2], tiny_images, ids=["ball", "kite"])
    questions = [
        Sample("green.png", "which color is the ball? the answer is:", " blue"),
        Sample("red.png", "which shape is the kite? the answer is:", " star"),
    ]
    batch = encode(questions, processor, editor.backbone, tiny_images)
    before, after = TEMPLATES["plain"]
    written = [
        Sample(q.image, before + r.prompt + " " + r.target + after + q.prompt, q.target)
        for q, r in zip(questions, REQUESTS[:2], strict=True)
    ]
    reference = encode(written, processor, editor.backbone, tiny_images)
    with torch.no_grad():
        got = editor.logits(batch)
        want = plain_logits(editor, reference)  # the LoRA acts: edits are held
    for row in range(2):
        torch.testing.assert_close(
            got[row][batch.target_mask[row]], want[row][reference.target_mask[row]],
            atol=1e-5, rtol=1e-4,
        )
    choices = [editor.explain(tiny_images(q.image), q.prompt) for q in questions]
    assert [c.edit_id for c in choices] == ["ball", "kite"] and all(c.prefixed for c in choices)


def test_a_threshold_leaves_far_questions_without_a_fact(fresh, tiny_images):
    _, model, processor = fresh
    editor = random_editor(model, processor, threshold=0.5)
    editor.apply(REQUESTS[:1], tiny_images)
    far = Sample(None, "nq question: who was the leader of the country?", " man")
    near = REQUESTS[0].sample()
    assert not editor.explain(None, far.prompt).prefixed
    assert editor.explain(tiny_images("red.png"), near.prompt).prefixed
    text = encode([far], processor, editor.backbone, tiny_images)
    image = batch_of(editor, tiny_images, REQUESTS[:1])
    with torch.no_grad():
        with editor.disabled():
            base = plain_logits(editor, text)
        thresholded = (editor.logits(text), editor.logits(image))
        assert torch.equal(thresholded[0], plain_logits(editor, text))  # the LoRA, no prefix
        assert not torch.allclose(thresholded[0], base)
    editor.detach()
    always = random_editor(model, processor)  # LTE: the nearest fact, however far
    always.apply(REQUESTS[:1], tiny_images)
    with torch.no_grad():
        torch.testing.assert_close(always.logits(image), thresholded[1])
        assert not torch.allclose(always.logits(text), thresholded[0])
    always.detach()


def test_save_load_batches_generation_and_remove(fresh, tiny_images, tmp_path):
    _, model, processor = fresh
    before = state_bytes(model)
    editor = random_editor(model, processor)
    editor.apply(REQUESTS[:2], tiny_images, ids=["a", "b"])
    batch = batch_of(editor, tiny_images)
    with torch.no_grad():
        together = editor.logits(batch)
        for row, request in enumerate(REQUESTS):  # each row as alone
            alone = editor.logits(batch_of(editor, tiny_images, [request]))
            n = int(batch.attention_mask[row].sum())
            torch.testing.assert_close(together[row, :n], alone[0, :n], atol=1e-4, rtol=1e-4)
    prompt = encode_prompts([Sample("red.png", REQUESTS[0].prompt, "")], processor,
                            editor.backbone, tiny_images)
    greedy = {"do_sample": False, "num_beams": 1, "min_new_tokens": 3,
              "pad_token_id": processor.tokenizer.pad_token_id, "max_new_tokens": 3}
    with torch.no_grad():
        cached = editor.generate(prompt, use_cache=True, **greedy)
        uncached = editor.generate(prompt, use_cache=False, **greedy)
    assert cached.shape == (1, 3) and torch.equal(cached, uncached)
    editor.save_pretrained(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert meta["method"] == "lte" and [e["id"] for e in meta["edits"]] == ["a", "b"]
    editor.restore()
    editor.detach()
    loaded = LTEditor.from_pretrained(model, processor, tmp_path / "saved")
    assert [e.id for e in loaded.edits()] == ["a", "b"]
    with torch.no_grad():
        assert torch.equal(loaded.logits(batch), together)
    loaded.remove("a")
    assert [e.id for e in loaded.edits()] == ["b"] and [f.id for f in loaded.facts] == ["b"]
    with pytest.raises(KeyError):
        loaded.remove("a")
    bad = dict(loaded.state_tensors())
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing keys"):
        loaded.load_state(loaded.folder_meta(), bad, "test")
    loaded.restore()
    loaded.detach()
    assert same_state(model, before)


# -- training -------------------------------------------------------------------------------------


def test_train_lte_gives_a_loadable_best_folder(tiny_factory, tmp_path):
    train_split = write_tiny_mmedit(tmp_path / "data", n=10)
    model, processor = tiny_factory("blip2")
    before = state_bytes(model)
    assert METHOD.train is train_lte and METHOD.name == "lte"
    result = METHOD.train(
        model, processor, train_split, config={"lora_r": 4, "lora_targets": ["q", "v"]},
        settings=TrainSettings(lr=1e-2, batch_size=4, max_steps=3, eval_every=3, val_edits=2,
                               log_every=1, patience=None),
        out_dir=tmp_path / "run", progress=False, calibrate_tau=True,  # ignored by LTE
    )
    log = json.loads(result.log_path.read_text())
    assert log["meta"]["method"] == "lte" and log["meta"]["config"]["lora_r"] == 4
    train_entries = [e for e in log["entries"] if e["kind"] == "train"]
    assert {"l_rel", "l_gen", "l_loc", "l_loc_plain"} <= set(train_entries[0])
    assert same_state(model, before)
    editor = LTEditor.from_pretrained(model, processor, result.best_dir)
    try:
        assert editor.config.lora_targets == ("q", "v") and editor.edits() == []
        assert any(t.abs().sum() > 0 for k, t in editor.state_tensors().items()
                   if k.endswith("lora_B.weight"))  # trained away from B = 0
    finally:
        editor.detach()


def test_the_loss_decreases_on_a_fixed_batch(tiny_factory, tmp_path):
    train_split = write_tiny_mmedit(tmp_path / "data", n=4)
    model, processor = tiny_factory("llava")
    trainable = LTETrainable(model, processor, train_split, config={"lora_r": 4})
    try:
        batch = encode_edits_batch(
            list(train_split), train_split.task, processor, trainable.editor.backbone,
            train_split.images,
        )
        with torch.no_grad():
            metrics = trainable.metrics(batch)
            out, plain = edit_pass(trainable.editor, batch, trainable.prefixes(batch.records))
        assert list(metrics) == ["rel", "t_gen", "v_gen", "t_loc", "m_loc"]
        assert plain == {}
        # B = 0 at init: the LoRA model with the fact equals the base with it; the locality
        # KLs are against the base without it, so they need not be 0, but the plain one is.
        loss, terms = trainable.loss(batch)
        assert float(terms["l_loc_plain"].detach()) == pytest.approx(0.0, abs=1e-6)
        optimizer = torch.optim.Adam(list(trainable.parameters()), lr=1e-2)
        losses = []
        for _ in range(20):
            loss, _ = trainable.loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        # The tiny random model's head is near uniform (NLL about log(vocab) per sample), so
        # a LoRA inside the layers moves the loss by about a nat in 20 steps.
        assert losses[-1] < losses[0] - 1.0
        assert all(p.grad is None for p in model.parameters())  # the base model never trains
    finally:
        trainable.close()
