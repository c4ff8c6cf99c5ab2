"""Choosing the gate threshold on held-out edits: the threshold rule, the per-record loop on a
stand-in editor with known similarities, and a real tiny editor (memory left empty, edits kept
safe)."""

from __future__ import annotations

import pytest
import torch
from test_train_data import write_tiny_mmedit

from dualedit.backbones import get_backbone
from dualedit.data.prompts import record_samples
from dualedit.editors.dualedit import DualEditConfig, DualEditor
from dualedit.editors.dualedit.calibrate import best_threshold, choose_tau
from dualedit.editors.dualedit.decision import GateDecision


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    return write_tiny_mmedit(tmp_path_factory.mktemp("tiny_mmedit"), n=6)


def test_best_threshold_counts_right_decisions_and_prefers_the_widest_gap():
    assert best_threshold(torch.tensor([0.9, 0.95]), torch.tensor([0.5, 0.7])) == (0.8, 1.0)
    # 3 of 4 right at 0.55 (gap 0.1) and at 0.8 (gap 0.2): the wider gap wins.
    assert best_threshold(torch.tensor([0.9, 0.6]), torch.tensor([0.5, 0.7])) == (0.8, 0.75)
    tau, accuracy = best_threshold(torch.tensor([0.9]), torch.tensor([]))
    assert accuracy == 1.0 and tau <= 0.9


class StandIn:
    """An editor whose gate similarity is 0.9 for its edit's rephrased question (T-Gen) or
    rephrased image (V-Gen), and 0.4 for everything else."""

    def __init__(self):
        self.memory, self.applied, self.asked = [], [], []

    def apply(self, records, task, images):
        self.memory.extend(records)
        self.applied.append(records[0].index)

    def restore(self):
        self.memory.clear()

    def explain(self, image, prompt):
        assert len(self.memory) == 1
        record = self.memory[0]
        related = prompt.startswith(record.rephrase) or (
            prompt.startswith(record.src) and image is not None
        )
        self.asked.append(prompt)
        return GateDecision(edit_id=0, similarity=0.9 if related else 0.4, gate_open=True, edited=True)


def test_choose_tau_edits_each_record_alone(tiny_train):
    editor = StandIn()
    choice = choose_tau(editor, tiny_train, [0, 2, 4])
    assert editor.applied == [0, 2, 4] and editor.memory == []
    assert len(editor.asked) == 3 * 4  # t_gen, v_gen, m_loc, t_loc (no hard fields here)
    assert 0.4 < choice.tau < 0.9 and choice.accuracy == 1.0 and choice.edits == 3
    assert choice.pass_rates == {"t_gen": 1.0, "v_gen": 1.0, "m_loc": 0.0, "t_loc": 0.0}
    with pytest.raises(ValueError, match="at least one"):
        choose_tau(editor, tiny_train, [])


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
            editor.apply([record], "vqa", tiny_train.images)
            for kind, sample in record_samples(record, "vqa").items():
                if kind in passed:
                    image = None if sample.image is None else tiny_train.images(sample.image)
                    passed[kind].append(editor.explain(image, sample.prompt).similarity >= choice.tau)
            editor.restore()
        assert {k: sum(v) / len(v) for k, v in passed.items()} == choice.pass_rates
        editor.apply([tiny_train[0]], "vqa", tiny_train.images)
        with pytest.raises(ValueError, match="holds 1 edits"):
            choose_tau(editor, tiny_train, [0])
        assert len(editor.memory) == 1  # refused, not cleared
    finally:
        editor.detach()
