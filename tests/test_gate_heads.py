"""The learned gate key: heads fitted on key parts keep an input's own edit and refuse look-alikes
with many edits stored; saved and loaded with the adapters; decided per input in a batch."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_data import write_tiny_mmedit

import dualedit.editors.dualedit.heads as heads_module
from dualedit.editors.dualedit import DualEditor, calibrate_adapters, train_dualedit
from dualedit.editors.dualedit.gate import IMAGE_GROUPS, learned_similarity
from dualedit.editors.dualedit.heads import GateHeads, fit_gate_heads
from dualedit.train import TrainSettings

HIDDEN = 16


def synthetic(n, seed, entities=40, questions=4, noise=0.35):
    """Key parts of n records of a toy world: an image shows one entity, a question asks one of
    a few attributes; each record edits one distinct (entity, question) fact, and its locality
    inputs ask facts no record edits (as the built-in world draws them). Returns parts, answers."""
    g = torch.Generator().manual_seed(seed)
    ent = torch.randn(entities, HIDDEN, generator=torch.Generator().manual_seed(100))
    que = torch.randn(questions, HIDDEN, generator=torch.Generator().manual_seed(101))
    facts = torch.randperm(entities * questions, generator=g)[:n]
    e, q = facts // questions, facts % questions
    edited = set(facts.tolist())
    free = [f for f in range(entities * questions) if f not in edited]

    def unedited(entity=None, question=None):
        pool = [f for f in free if (entity is None or f // questions == entity)
                and (question is None or f % questions == question)] or free
        return pool[int(torch.randint(len(pool), (1,), generator=g))]

    m_loc = torch.tensor([unedited(entity=int(x)) for x in e])  # the edited entity, other fact
    hard = torch.tensor([unedited(question=int(x)) for x in q])  # the same attribute, other entity

    def inputs(entity, question):
        base = ent[entity] + noise * torch.randn(n, HIDDEN, generator=g)
        return {"image_mean": base, "image_groups": base.repeat(1, IMAGE_GROUPS)
                + noise * torch.randn(n, HIDDEN * IMAGE_GROUPS, generator=g),
                "prompt_end": que[question] + noise * torch.randn(n, HIDDEN, generator=g)}

    no_image = {"image_mean": torch.zeros(n, HIDDEN),
                "image_groups": torch.zeros(n, HIDDEN * IMAGE_GROUPS),
                "prompt_end": torch.randn(n, HIDDEN, generator=g)}
    parts = {"edit": inputs(e, q), "t_gen": inputs(e, q), "v_gen": inputs(e, q),
             "m_loc": inputs(m_loc // questions, m_loc % questions),
             "m_loc_hard": inputs(hard // questions, hard % questions), "t_loc": no_image}
    answers = {"edit": facts, "t_gen": facts, "v_gen": facts, "m_loc": m_loc,
               "m_loc_hard": hard, "t_loc": torch.full((n,), -1)}
    return parts, answers


def right_rates(heads, parts):
    """Every edit stored at once; gen right = nearest is its own and open; loc right = closed."""
    keys = heads.embed(parts["edit"])
    out = {}
    for kind in ("t_gen", "v_gen", "m_loc", "m_loc_hard", "t_loc"):
        best, nearest = learned_similarity(heads.embed(parts[kind]), keys).max(dim=1)
        opened = best >= heads.threshold
        if kind in ("t_gen", "v_gen"):
            out[kind] = float((opened & (nearest == torch.arange(len(keys)))).float().mean())
        else:
            out[kind] = float((~opened).float().mean())
    return out


@pytest.mark.parametrize("mlp", [0, None])  # linear heads, and the default two-layer ones
def test_fitted_heads_open_own_edits_and_refuse_look_alikes_with_many_stored(mlp):
    parts, answers = synthetic(120, seed=0)
    size = {} if mlp is None else {"mlp": mlp}
    heads = fit_gate_heads(parts, answers, width=16, steps=400, batch_size=64, **size)
    assert heads.mlp == (heads_module.MLP if mlp is None else mlp)
    test_parts, _ = synthetic(48, seed=1)  # other records of the same world, all stored at once
    rates = right_rates(heads, test_parts)
    assert min(rates.values()) >= 0.85, rates
    untrained = right_rates(GateHeads(HIDDEN, 16, **size), test_parts)
    assert sum(rates.values()) > sum(untrained.values()) + 0.5
    # Deterministic for a seed.
    again = fit_gate_heads(parts, answers, width=16, steps=400, batch_size=64, **size)
    assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(),
                                                  again.state_dict().values(), strict=True))
    # A text-only input never matches an edit with an image.
    keys = heads.embed(test_parts["edit"])
    assert (learned_similarity(heads.embed(test_parts["t_loc"]), keys) <= 1e-6).all()


def test_two_layer_heads_fit_and_round_trip_through_their_meta():
    parts, answers = synthetic(120, seed=0)
    heads = fit_gate_heads(parts, answers, width=16, steps=400, batch_size=64, mlp=32)
    assert heads.mlp == 32 and isinstance(heads.image, torch.nn.Sequential)
    test_parts, _ = synthetic(48, seed=1)
    rates = right_rates(heads, test_parts)
    assert min(rates.values()) >= 0.8, rates
    meta = heads_module.heads_meta(heads)
    assert meta["mlp"] == 32
    again = heads_module.heads_from(meta, heads.state_dict(), "here")
    assert torch.equal(again.embed(test_parts["v_gen"]), heads.embed(test_parts["v_gen"]))
    # Meta written before the field existed means linear heads; a mismatch is refused by name.
    linear = GateHeads(HIDDEN, 16, mlp=0)
    old_meta = {k: v for k, v in heads_module.heads_meta(linear).items() if k != "mlp"}
    assert heads_module.heads_from(old_meta, linear.state_dict(), "old").mlp == 0
    with pytest.raises(ValueError, match="here: gate head tensors"):
        heads_module.heads_from(old_meta, heads.state_dict(), "here")
    with pytest.raises(ValueError, match="here: gate heads meta"):
        heads_module.heads_from({**meta, "mlp": -1}, heads.state_dict(), "here")


def test_fit_refuses_bad_inputs():
    parts, answers = synthetic(8, seed=0)
    with pytest.raises(ValueError, match="need 'edit'"):
        fit_gate_heads({k: v for k, v in parts.items() if k != "v_gen"}, answers, steps=1)
    short = {**parts, "m_loc": {p: t[:4] for p, t in parts["m_loc"].items()}}
    with pytest.raises(ValueError, match="every kind alike"):
        fit_gate_heads(short, answers, steps=1)
    nan = {**parts, "edit": {**parts["edit"], "image_groups": parts["edit"]["image_groups"]
                             * float("nan")}}
    with pytest.raises(ValueError, match="lack"):
        fit_gate_heads(nan, answers, steps=1)
    for stored in (0, 9):  # edits stored per step: at least one, at most the batch (8 here)
        with pytest.raises(ValueError, match="stored must be in"):
            fit_gate_heads(parts, answers, steps=1, stored=stored)


def test_heads_fitted_against_a_fuller_memory_per_step_still_separate():
    parts, answers = synthetic(120, seed=0)
    heads = fit_gate_heads(parts, answers, width=16, steps=400, batch_size=120, stored=100)
    rates = right_rates(heads, synthetic(48, seed=1)[0])
    assert min(rates.values()) >= 0.85, rates
    # Another number stored per step is another fit (the argument is used).
    other = fit_gate_heads(parts, answers, width=16, steps=400, batch_size=120, stored=20)
    assert not torch.equal(other.embed(parts["edit"]), heads.embed(parts["edit"]))


CONFIG = {"text_layer": 2, "visual_layer": 3, "width": 16, "heads": 2}


def test_calibrating_with_the_learned_key_fits_saves_and_serves_the_heads(
        tiny_factory, tmp_path, monkeypatch):
    monkeypatch.setattr(heads_module, "STEPS", 30)
    model, processor = tiny_factory("llava")
    data = write_tiny_mmedit(tmp_path / "data", n=10)
    editor = DualEditor(model, processor, **CONFIG)
    editor.save_pretrained(tmp_path / "src")
    editor.detach()
    with pytest.raises(ValueError, match="needs fitted gate heads"):
        unfitted = DualEditor.from_pretrained(model, processor, tmp_path / "src",
                                              gate_key="learned")
        try:
            unfitted.apply_records = None
            record = data[0]
            unfitted.edit(data.images(record.image), "q", " a")
            unfitted.explain(data.images(record.image), "what is it?")
        finally:
            unfitted.detach()
    choice = calibrate_adapters(model, processor, tmp_path / "src", data, out_dir=tmp_path / "out",
                                val_edits=3, gate_key="learned")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["config"]["gate_key"] == "learned" and saved["config"]["tau"] == choice.tau
    assert saved["gate_heads"]["hidden"] == model.config.text_config.hidden_size
    assert saved["gate_heads"]["mlp"] == heads_module.MLP == 256  # the default: two layers
    assert "gate_heads.safetensors" in saved["files"]
    loaded = DualEditor.from_pretrained(model, processor, tmp_path / "out")
    try:
        heads = loaded.memory.gate_heads
        assert heads is not None and not any(p.requires_grad for p in heads.parameters())
        a, b = data[0], data[1]
        loaded.edit(data.images(a.image), "What is it? The answer is:", " zebra")
        loaded.edit(data.images(b.image), "What colour is it? The answer is:", " mauve")
        # One decision per input of a batch, each equal to the input's own alone.
        alone = [loaded.explain(data.images(r.image), p) for r, p in (
            (a, "What is it? The answer is:"), (b, "What colour is it? The answer is:"))]
        assert [d.edit_id for d in alone] == [0, 1]
        assert all(d.similarity > 0.99 for d in alone)  # its own key: cosine 1 on both halves
        text_only = loaded.explain(None, "Who wrote the book? The answer is:")
        assert text_only.similarity <= 1e-6 and not text_only.gate_open
        # Saved again with the edits, the heads and the memory come back together.
        loaded.save_pretrained(tmp_path / "with-edits")
    finally:
        loaded.detach()
    again = DualEditor.from_pretrained(model, processor, tmp_path / "with-edits")
    try:
        assert len(again.memory) == 2
        assert all(torch.equal(x, y) for x, y in zip(
            again.memory.gate_heads.state_dict().values(), heads.state_dict().values(),
            strict=True))
        assert again.explain(data.images(a.image), "What is it? The answer is:").edit_id == 0
    finally:
        again.detach()
    # Other heads by a calibration option (0: linear): saved with their size, loaded as such.
    calibrate_adapters(model, processor, tmp_path / "src", data, out_dir=tmp_path / "linear",
                       val_edits=3, gate_key="learned", heads_mlp=0)
    saved = json.loads((tmp_path / "linear" / "adapter_config.json").read_text())
    assert saved["gate_heads"]["mlp"] == 0
    calibrate_adapters(model, processor, tmp_path / "src", data, out_dir=tmp_path / "mlp",
                       val_edits=3, gate_key="learned", heads_mlp=8)
    saved = json.loads((tmp_path / "mlp" / "adapter_config.json").read_text())
    assert saved["gate_heads"]["mlp"] == 8
    two = DualEditor.from_pretrained(model, processor, tmp_path / "mlp")
    try:
        assert two.memory.gate_heads.mlp == 8
        two.edit(data.images(a.image), "What is it? The answer is:", " zebra")
        assert two.explain(data.images(a.image), "What is it? The answer is:").similarity > 0.99
    finally:
        two.detach()
    # Calibrated again to a fixed key, the learned heads are not carried into its folder.
    calibrate_adapters(model, processor, tmp_path / "out", data, out_dir=tmp_path / "fixed",
                       val_edits=3, gate_key="prompt_end_image")
    saved = json.loads((tmp_path / "fixed" / "adapter_config.json").read_text())
    assert "gate_heads" not in saved and "gate_heads.safetensors" not in saved["files"]
    assert not (tmp_path / "fixed" / "gate_heads.safetensors").exists()
    with pytest.raises(ValueError, match="heads_mlp"):
        calibrate_adapters(model, processor, tmp_path / "src", data, val_edits=3,
                           gate_key="learned", heads_mlp=-1)
    # Heads asked for with a key that has none: refused before anything is written, the
    # model left without hooks.
    before = (tmp_path / "src" / "adapter_config.json").read_bytes()
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    with pytest.raises(ValueError, match=r"heads_mlp=8: gate heads exist only with gate_key="):
        calibrate_adapters(model, processor, tmp_path / "src", data, out_dir=tmp_path / "no",
                           val_edits=3, gate_key="prompt_end", heads_mlp=8)
    assert not (tmp_path / "no").exists()
    assert (tmp_path / "src" / "adapter_config.json").read_bytes() == before
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == hooks


def tiny_training(tiny_factory, tmp_path):
    """A fresh tiny LLaVA, 10 E-VQA records and two training steps (heads fitted for 30 steps:
    conftest's `short_gate_head_fits`)."""
    model, processor = tiny_factory("llava")
    data = write_tiny_mmedit(tmp_path / "data", n=10)
    settings = TrainSettings(lr=1e-2, batch_size=4, max_steps=2, eval_every=2, val_edits=3,
                             patience=None)
    return model, processor, data, settings


def test_training_with_the_learned_key_fits_heads_of_the_asked_size(tiny_factory, tmp_path):
    """`train_dualedit(heads_mlp=N)` (`dualedit train --train-option heads_mlp=N`): the heads
    fitted at the end have N hidden units; with a key that has no heads it is refused before
    anything trains."""
    model, processor, data, settings = tiny_training(tiny_factory, tmp_path)
    with pytest.raises(ValueError, match="heads_mlp=8: gate heads exist only with"):
        train_dualedit(model, processor, data, config={**CONFIG, "gate_key": "prompt_end_image"},
                       settings=settings, out_dir=tmp_path / "refused", heads_mlp=8,
                       progress=False)
    assert not (tmp_path / "refused").exists()
    result = train_dualedit(model, processor, data, config={**CONFIG, "gate_key": "learned"},
                            settings=settings, out_dir=tmp_path / "run", heads_mlp=8,
                            progress=False)
    saved = json.loads((result.best_dir / "adapter_config.json").read_text())
    assert saved["gate_heads"]["mlp"] == 8 and saved["config"]["tau"] == result.tau.tau


def test_training_without_a_gate_key_saves_the_learned_key_unless_tau_is_fixed(
        tiny_factory, tmp_path):
    """The default gate key of a training is "learned": heads fitted and saved, tau chosen after
    them, and the saved editor serves them. A config that fixes tau keeps the architecture's
    fixed key (no heads, tau as given)."""
    model, processor, data, settings = tiny_training(tiny_factory, tmp_path)
    result = train_dualedit(model, processor, data, config=CONFIG, settings=settings,
                            out_dir=tmp_path / "default", progress=False)
    saved = json.loads((result.best_dir / "adapter_config.json").read_text())
    assert saved["config"]["gate_key"] == "learned" and "gate_heads" in saved
    assert saved["config"]["tau"] == result.tau.tau
    editor = DualEditor.from_pretrained(model, processor, result.best_dir)
    try:
        assert editor.config.gate_key == "learned" and editor.memory.gate_heads is not None
    finally:
        editor.detach()

    fixed = train_dualedit(model, processor, data, config={**CONFIG, "tau": 0.5},
                           settings=settings, out_dir=tmp_path / "fixed", progress=False,
                           calibrate_tau=False)
    saved = json.loads((fixed.best_dir / "adapter_config.json").read_text())
    assert saved["config"]["gate_key"] == "prompt_end_image" and "gate_heads" not in saved
    assert saved["config"]["tau"] == 0.5


def test_too_few_train_records_keep_the_fixed_key_and_refuse_an_asked_learned_one(
        tiny_factory, tmp_path):
    """With one train record outside the validation edits the heads cannot be fitted: the
    default falls back to the fixed key (trained and saved), an asked learned key is refused
    before anything trains, naming the file."""
    model, processor = tiny_factory("llava")
    data = write_tiny_mmedit(tmp_path / "data", n=4)
    settings = TrainSettings(lr=1e-2, batch_size=1, max_steps=1, eval_every=1, val_edits=3,
                             patience=None)
    with pytest.raises(ValueError, match="gate_key=learned: .* at least 2; .*vqa_train.json"):
        train_dualedit(model, processor, data, config={**CONFIG, "gate_key": "learned"},
                       settings=settings, out_dir=tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    result = train_dualedit(model, processor, data, config=CONFIG, settings=settings,
                            out_dir=tmp_path / "run", progress=False)
    saved = json.loads((result.best_dir / "adapter_config.json").read_text())
    assert saved["config"]["gate_key"] == "prompt_end_image" and "gate_heads" not in saved
