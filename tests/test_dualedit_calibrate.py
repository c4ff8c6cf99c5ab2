"""Choosing the gate threshold on held-out edits: the threshold rule, the per-record loop on a
stand-in editor with known similarities, and a real tiny editor (memory left empty, edits kept
safe)."""

from __future__ import annotations

import pytest
import torch
from test_train_data import write_tiny_mmedit

from dualedit.backbones import get_backbone
from dualedit.data.prompts import record_samples
from dualedit.data.requests import edit_request, edit_requests
from dualedit.editors.dualedit import DualEditConfig, DualEditor
from dualedit.editors.dualedit.calibrate import best_threshold, choose_tau
from dualedit.editors.dualedit.gate import GateDecision


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    return write_tiny_mmedit(tmp_path_factory.mktemp("tiny_mmedit"), n=6)


def test_best_threshold_counts_right_decisions_and_prefers_the_widest_gap():
    assert best_threshold(torch.tensor([0.9, 0.95]), torch.tensor([0.5, 0.7])) == (0.8, 1.0)
    # 3 of 4 right at 0.55 (gap 0.1) and at 0.8 (gap 0.2): the wider gap wins.
    assert best_threshold(torch.tensor([0.9, 0.6]), torch.tensor([0.5, 0.7])) == (0.8, 0.75)
    tau, accuracy = best_threshold(torch.tensor([0.9]), torch.tensor([]))
    assert accuracy == 1.0 and tau <= 0.9


class Memory(list):
    """Stored records; ids are their record indices."""

    @property
    def ids(self):
        return [record.index for record in self]


class StandIn:
    """An editor whose gate similarity is 0.9 for its edit's rephrased question (T-Gen) or
    rephrased image (V-Gen), and 0.4 for everything else; with several edits stored, the
    nearest is the related one, else the first (`unrelated` raises what the others score).
    It is given edit requests, as every editor is, and looks their records up in `dataset`
    to know what is related."""

    def __init__(self, dataset, unrelated=0.4):
        self.records = {
            edit_request(dataset[i], dataset.task): dataset[i] for i in range(len(dataset))
        }
        self.memory, self.applied, self.asked = Memory(), [], []
        self.unrelated = unrelated

    def apply(self, requests, images):
        records = [self.records[request] for request in requests]
        self.memory.extend(records)
        self.applied.append([record.index for record in records])

    def restore(self):
        self.memory.clear()

    def explain(self, image, prompt):
        self.asked.append(prompt)
        for record in self.memory:
            if prompt.startswith(record.rephrase) or (
                prompt.startswith(record.src) and image is not None
            ):
                return GateDecision(record.index, 0.9, True, True)
        first = self.memory[0].index
        return GateDecision(first, 0.4 if len(self.memory) == 1 else self.unrelated, True, True)


def test_choose_tau_edits_each_record_alone(tiny_train):
    editor = StandIn(tiny_train)
    choice = choose_tau(editor, tiny_train, [0, 2, 4])
    assert editor.applied == [[0], [2], [4]] and editor.memory == []
    assert len(editor.asked) == 3 * 4  # t_gen, v_gen, m_loc, t_loc (no hard fields here)
    assert 0.4 < choice.tau < 0.9 and choice.accuracy == 1.0 and choice.edits == 3
    assert choice.pass_rates == {"t_gen": 1.0, "v_gen": 1.0, "m_loc": 0.0, "t_loc": 0.0}
    assert choice.mode == "single"
    with pytest.raises(ValueError, match="at least one"):
        choose_tau(editor, tiny_train, [])
    with pytest.raises(ValueError, match="mode must be one of"):
        choose_tau(editor, tiny_train, [0], mode="together")


def test_choose_tau_sequential_stores_every_edit_at_once(tiny_train):
    """With all edits stored, unrelated inputs meet every edit and score higher (0.7 here, a
    stand-in for the nearest of many): the threshold rises above them; alone they score 0.4."""
    single = choose_tau(StandIn(tiny_train, unrelated=0.7), tiny_train, [0, 2, 4])
    editor = StandIn(tiny_train, unrelated=0.7)
    together = choose_tau(editor, tiny_train, [0, 2, 4], mode="sequential")
    assert editor.applied == [[0, 2, 4]] and editor.memory == []
    assert together.mode == "sequential" and together.edits == 3 and together.accuracy == 1.0
    assert 0.4 < single.tau < 0.7 < together.tau < 0.9
    assert together.pass_rates == {"t_gen": 1.0, "v_gen": 1.0, "m_loc": 0.0, "t_loc": 0.0}


def test_choose_tau_sequential_leaves_out_inputs_nearest_to_another_edit(tiny_train):
    """A T-Gen/V-Gen input whose nearest edit is another record's is wrong whatever tau is."""

    class Misrouted(StandIn):
        def explain(self, image, prompt):
            decision = super().explain(image, prompt)
            if decision.similarity == 0.9 and decision.edit_id == 2:
                return GateDecision(0, 0.3, True, True)  # record 2's inputs go to edit 0
            return decision

    choice = choose_tau(Misrouted(tiny_train), tiny_train, [0, 2, 4], mode="sequential")
    # Counted, record 2's 0.3 would sit below every unrelated input: no tau gets all right.
    assert choice.accuracy == 1.0 and 0.4 < choice.tau < 0.9
    assert choice.pass_rates == {"t_gen": 1.0, "v_gen": 1.0, "m_loc": 0.0, "t_loc": 0.0}


def test_choose_tau_on_a_tiny_editor(tiny_factory, tiny_vlm, tiny_train):
    model, processor = tiny_factory(tiny_vlm.name)
    editor = DualEditor(model, processor, get_backbone(model),
                        config=DualEditConfig(text_layer=2, visual_layer=3, width=16, heads=2))
    try:
        choice = choose_tau(editor, tiny_train, [0, 1, 2])
        assert len(editor.memory) == 0
        assert 0.0 <= choice.accuracy <= 1.0 and -1.0 <= choice.tau <= 1.0
        assert set(choice.pass_rates) == {"t_gen", "v_gen", "m_loc", "t_loc"}
        # The reported pass rates are what tau decides on the same inputs, measured again.
        passed = {kind: [] for kind in choice.pass_rates}
        for index in (0, 1, 2):
            record = tiny_train[index]
            editor.apply(edit_requests([record], "vqa"), tiny_train.images)
            for kind, sample in record_samples(record, "vqa").items():
                if kind in passed:
                    image = None if sample.image is None else tiny_train.images(sample.image)
                    passed[kind].append(editor.explain(image, sample.prompt).similarity >= choice.tau)
            editor.restore()
        assert {k: sum(v) / len(v) for k, v in passed.items()} == choice.pass_rates
        editor.apply(edit_requests([tiny_train[0]], "vqa"), tiny_train.images)
        with pytest.raises(ValueError, match="holds 1 edits"):
            choose_tau(editor, tiny_train, [0])
        assert len(editor.memory) == 1  # refused, not cleared
    finally:
        editor.detach()


def test_choose_tau_sequential_on_a_tiny_editor(tiny_factory, tiny_vlm, tiny_train):
    """All edits stored at once: an input's similarity is to its nearest edit, so a block input
    scores at least what it scores against its own record's edit alone; the memory is emptied."""
    model, processor = tiny_factory(tiny_vlm.name)
    editor = DualEditor(model, processor, get_backbone(model),
                        config=DualEditConfig(text_layer=2, visual_layer=3, width=16, heads=2,
                                              gate_key="prompt_end_and_image"))
    try:
        choice = choose_tau(editor, tiny_train, [0, 1, 2], mode="sequential")
        assert len(editor.memory) == 0 and choice.mode == "sequential" and choice.edits == 3
        assert 0.0 <= choice.accuracy <= 1.0 and -1.0 <= choice.tau <= 1.0
        editor.apply(edit_requests([tiny_train[i] for i in (0, 1, 2)], "vqa"), tiny_train.images)
        together = editor.explain(tiny_train.images(tiny_train[1].m_loc), tiny_train[1].m_loc_q)
        editor.restore()
        editor.apply(edit_requests([tiny_train[1]], "vqa"), tiny_train.images)
        alone = editor.explain(tiny_train.images(tiny_train[1].m_loc), tiny_train[1].m_loc_q)
        editor.restore()
        assert together.similarity >= alone.similarity - 1e-6
    finally:
        editor.detach()


@pytest.mark.parametrize("gate_key", ["prompt_end_image", "prompt_end_and_image"])
def test_choose_tau_with_distractors_scores_inputs_against_the_fuller_memory(
        tiny_factory, tiny_vlm, tiny_train, gate_key):
    """Distractors' edits are stored too; each held-out input meets its nearest stored edit, as
    the hooks decide it with every edit stored, except edits of the same unedited answer as the
    input's (every record here has pred "person": a T-Gen / V-Gen input keeps only its own
    edit; M-Loc, "blue", and T-Loc meet every edit)."""
    from dualedit.editors.dualedit.calibrate import _similarities_among_distractors

    model, processor = tiny_factory(tiny_vlm.name)
    editor = DualEditor(model, processor, get_backbone(model),
                        config=DualEditConfig(text_layer=2, visual_layer=3, width=16, heads=2,
                                              gate_key=gate_key))
    held, others = [0, 1, 2], [3, 4, 5]

    def hooks_view(stored, queries, kinds):
        """{kind: the hooks' similarity of each query record's input} with `stored` edited."""
        editor.apply(edit_requests([tiny_train[i] for i in stored], "vqa"), tiny_train.images)
        out = {kind: [] for kind in kinds}
        for index in queries:
            for kind in kinds:
                sample = record_samples(tiny_train[index], "vqa")[kind]
                image = None if sample.image is None else tiny_train.images(sample.image)
                out[kind].append(editor.explain(image, sample.prompt).similarity)
        editor.restore()
        return out

    try:
        sims = _similarities_among_distractors(editor, tiny_train, held, others)
        assert len(editor.memory) == 0
        block, gen = ("m_loc", "t_loc"), ("t_gen", "v_gen")
        full, fewer = hooks_view(held + others, held, block), hooks_view(held, held, block)
        for kind in block:
            assert sims[kind] == pytest.approx(full[kind], abs=1e-4), kind
            assert all(a >= b - 1e-6 for a, b in zip(full[kind], fewer[kind], strict=True))
        alone = {kind: [] for kind in gen}  # each record's edit stored alone
        for index in held:
            for kind, values in hooks_view([index], [index], gen).items():
                alone[kind] += values
        for kind in gen:  # every other edit left out: its own edit alone
            assert sims[kind] == pytest.approx(alone[kind], abs=1e-4), kind
        # With no distractors (an empty list) the masks still apply; None: every edit counts.
        assert _similarities_among_distractors(editor, tiny_train, held, [])["t_gen"] == \
            pytest.approx(alone["t_gen"], abs=1e-4)
        choice = choose_tau(editor, tiny_train, held, mode="sequential", distractors=others)
        assert choice.stored == 6 and choice.edits == 3 and "6 stored" in choice.describe()
        with pytest.raises(ValueError, match="only in the sequential mode"):
            choose_tau(editor, tiny_train, held, distractors=others)
        with pytest.raises(ValueError, match="other records"):
            choose_tau(editor, tiny_train, held, mode="sequential", distractors=[2, 3])
    finally:
        editor.detach()


def test_distractor_indices_fill_the_memory_to_the_asked_size():
    from dualedit.editors.dualedit.calibrate import distractor_indices

    val = [1, 4, 7]
    picked = distractor_indices(20, val, 10, "sequential")
    assert len(picked) == 7 and not set(picked) & set(val) and picked == sorted(picked)
    assert picked == distractor_indices(20, val, 10, "sequential")  # a fixed selection
    assert distractor_indices(20, val, None, "sequential") is None
    assert distractor_indices(20, val, 3, "sequential") == []
    assert len(distractor_indices(20, val, 20, "sequential")) == 17
    for bad in (2, 21, 5.0, True, "10"):
        with pytest.raises(ValueError, match="calibration option stored"):
            distractor_indices(20, val, bad, "sequential")
    with pytest.raises(ValueError, match="mode=sequential"):
        distractor_indices(20, val, 10, "single")
