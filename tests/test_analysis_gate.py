"""Gate separability analysis (Figure 4): the threshold search on known arrays, and on both tiny
backbones the similarities against cosines computed here from `LayerTrace` outputs, the
causality invariants, the gate module's own similarity, hooks, the JSON and the figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VOCAB
from test_train_data import write_tiny_mmedit

from dualedit.analysis.figures import read_json
from dualedit.analysis.gate import (
    IN_SCOPE,
    KEYS,
    OUT_OF_SCOPE,
    QUERY_KINDS,
    best_threshold,
    run_gate,
)
from dualedit.analysis.inputs import analysis_data
from dualedit.data.mmedit import MMEditDataset
from dualedit.data.prompts import encode, record_samples
from dualedit.editors.capture import LayerTrace
from dualedit.editors.dualedit.gate import (
    KIND_PARTS,
    gate_vectors,
    key_parts,
    similarity_matrix,
)

RECORDS = 6
HARD = (0, 2)  # records given the hard-locality fields
SAME_REPHRASE = 0  # rephrase == src: its T-Gen sample is the edit sample
SAME_PROMPT_M_LOC = 1  # M-Loc = edit image and question, another answer


# -- the threshold search --------------------------------------------------------------------------


def test_separable_groups_have_zero_error_and_tau_between_them():
    best = best_threshold([0.7, 0.8, 0.95], [0.1, 0.3, 0.5])
    assert best.balanced_error == 0.0 and best.in_reject == 0.0 and best.out_accept == 0.0
    assert 0.5 < best.tau <= 0.7 and best.tau == pytest.approx(0.6)
    assert best.auroc == 1.0


def test_identical_distributions_are_at_chance():
    values = [0.1, 0.4, 0.4, 0.9]
    best = best_threshold(values, values)
    assert best.balanced_error == pytest.approx(0.5)
    assert best.auroc == pytest.approx(0.5)


def test_overlapping_groups_known_answer():
    # tau 0.75 rejects 0.2, 0.6 (2/4) and accepts no out-of-scope value: error 0.25, the best.
    best = best_threshold([0.2, 0.6, 0.8, 0.9], [0.1, 0.3, 0.7])
    assert best.tau == pytest.approx(0.75)
    assert best.balanced_error == pytest.approx(0.25)
    assert (best.in_reject, best.out_accept) == (0.5, 0.0)
    assert best.auroc == pytest.approx(9 / 12)


def test_auroc_known_values_ties_and_reversal():
    assert best_threshold([0.3, 0.6], [0.1, 0.4]).auroc == pytest.approx(0.75)
    assert best_threshold([0.5], [0.5]).auroc == pytest.approx(0.5)
    reversed_ = best_threshold([0.1, 0.2], [0.8, 0.9])
    assert reversed_.auroc == 0.0
    # Nothing beats accepting (or rejecting) everything; ties go to the lowest tau: accept all.
    assert reversed_.balanced_error == pytest.approx(0.5) and reversed_.tau == pytest.approx(0.1)


def test_threshold_rejects_empty_and_non_finite():
    with pytest.raises(ValueError, match="in_scope"):
        best_threshold([], [0.1])
    with pytest.raises(ValueError, match="out_scope"):
        best_threshold([0.1], [float("nan")])


# -- the analysis on the tiny backbones ------------------------------------------------------------


def _dataset(root: Path) -> MMEditDataset:
    """The tiny E-VQA file with hard fields on some records and two records of known answers."""
    write_tiny_mmedit(root, n=RECORDS)
    path = root / "vqa" / "vqa_train.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    for i in HARD:
        raw[i].update(hard_m_loc=raw[i + 1]["image"], hard_m_loc_q=raw[i + 1]["src"],
                      hard_m_loc_a="dog")
    raw[SAME_REPHRASE]["rephrase"] = raw[SAME_REPHRASE]["src"]
    raw[SAME_PROMPT_M_LOC].update(m_loc=raw[SAME_PROMPT_M_LOC]["image"],
                                  m_loc_q=raw[SAME_PROMPT_M_LOC]["src"], m_loc_a="blue")
    path.write_text(json.dumps(raw), encoding="utf-8")
    return MMEditDataset(path)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def gate_run(tiny_vlm, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gate_{tiny_vlm.name}")
    data = analysis_data(tiny_vlm.model, tiny_vlm.processor, _dataset(root / "data"))
    # transformers adds its own output-capturing hooks on a model's first image forward.
    _, batch = next(data.batches("edit"))
    with torch.no_grad():
        data.backbone.forward_logits(data.model, batch.input_ids, batch.attention_mask,
                                     batch.pixel_values)
    before = _hook_count(tiny_vlm.model)
    result = run_gate(data, root / "out", batch_size=4, progress=False)
    return SimpleNamespace(vlm=tiny_vlm, data=data, result=result, out=root / "out",
                           hooks=(before, _hook_count(tiny_vlm.model)))


def _value(result, layer: int, key: str, kind: str, record: int) -> float:
    row = result["record_positions"][kind].index(record)
    return result["per_layer"][str(layer)][key]["similarity"][kind][row]


def _states(vlm, data, sample, layer: int):
    batch = encode([sample], vlm.processor, vlm.backbone, data.load_image)
    with torch.no_grad(), LayerTrace(vlm.model, vlm.backbone, [layer], stop=True) as trace:
        outputs = trace.run(lambda: vlm.backbone.forward_logits(
            vlm.model, batch.input_ids, batch.attention_mask, batch.pixel_values))
    return outputs[layer].float(), batch  # [1, seq, hidden]


def _text_mean(h, batch) -> torch.Tensor:
    end = int(batch.prompt_end[0])
    text = [p for p in range(end + 1) if not bool(batch.image_mask[0, p])]
    assert int(batch.input_ids[0, text[0]]) == TINY_VOCAB["<s>"]  # the BOS sink, left out
    return h[0, text[1:]].mean(dim=0)


@pytest.mark.parametrize(("kind", "record", "layer"), [("t_gen", 3, 2), ("m_loc_hard", 2, 4),
                                                       ("t_loc", 4, 1)])
def test_similarities_match_cosines_of_layer_outputs(gate_run, kind, record, layer):
    vlm, data, result = gate_run.vlm, gate_run.data, gate_run.result
    samples = record_samples(data.records[record], data.task)
    h_e, b_e = _states(vlm, data, samples["rel"], layer)  # the edit sample
    h_q, b_q = _states(vlm, data, samples[kind], layer)
    end_e, end_q = int(b_e.prompt_end[0]), int(b_q.prompt_end[0])
    expected = {
        "prompt_end": F.cosine_similarity(h_e[0, end_e], h_q[0, end_q], dim=0),
        "last_position": F.cosine_similarity(h_e[0, -1], h_q[0, -1], dim=0),  # no padding
        "text_mean": F.cosine_similarity(_text_mean(h_e, b_e), _text_mean(h_q, b_q), dim=0),
    }
    if b_q.image_mask.any():
        expected["image_mean"] = F.cosine_similarity(
            h_e[0, b_e.image_mask[0]].mean(0), h_q[0, b_q.image_mask[0]].mean(0), dim=0)
    else:
        expected["image_mean"] = torch.tensor(0.0)  # no image: counted as 0
    for key, value in expected.items():
        assert _value(result, layer, key, kind, record) == pytest.approx(float(value), abs=1e-4)
    # The gate's own kinds: exactly what its `similarity_matrix` gives for the two samples.
    for key in KIND_PARTS:
        vectors = [
            gate_vectors(key_parts(h, b.prompt_end, torch.tensor([h.shape[1] - 1]),
                                   b.image_mask & b.attention_mask.bool()), key)
            for h, b in ((h_q, b_q), (h_e, b_e))
        ]
        gate = float(similarity_matrix(vectors[0], vectors[1], key)[0, 0])
        assert _value(result, layer, key, kind, record) == pytest.approx(gate, abs=1e-4), key


def test_a_query_identical_to_the_edit_has_cosine_one(gate_run):
    for layer in gate_run.result["layers"]:
        for key in KEYS:
            value = _value(gate_run.result, layer, key, "t_gen", SAME_REPHRASE)
            assert value == pytest.approx(1.0, abs=1e-5), (layer, key)


def test_prompt_keys_ignore_the_target_by_causality(gate_run):
    # Same image and prompt, another answer: every key read at or before the last prompt token
    # is the edit's own; the last position (a different target token) is not.
    result = gate_run.result
    for layer in result["layers"]:
        for key in KEYS:
            value = _value(result, layer, key, "m_loc", SAME_PROMPT_M_LOC)
            if key == "last_position":
                assert value < 0.999, layer
            else:
                assert value == pytest.approx(1.0, abs=1e-5), (layer, key)


def test_text_only_queries_score_no_image_similarity(gate_run):
    for table in gate_run.result["per_layer"].values():
        assert table["image_mean"]["similarity"]["t_loc"] == [0.0] * RECORDS
        assert max(table["prompt_end_and_image"]["similarity"]["t_loc"]) <= 1e-6
        assert max(table["prompt_end_image"]["similarity"]["t_loc"]) <= 1 / math.sqrt(2) + 1e-6


def test_no_hooks_are_left_on_the_model(gate_run):
    before, after = gate_run.hooks
    assert after == before


def test_json_holds_every_layer_and_key_with_consistent_numbers(gate_run):
    result = gate_run.result
    saved = read_json(gate_run.out / "gate.json")
    assert saved["analysis"] == "gate" and saved["source"] == result["source"]
    assert saved["layers"] == list(range(6)) and saved["keys"] == list(KEYS)
    assert saved["per_layer"] == result["per_layer"] and saved["best"] == result["best"]
    assert saved["counts"] == {"t_gen": 6, "v_gen": 6, "m_loc": 6, "m_loc_hard": 2, "t_loc": 6}
    assert sorted(saved["record_positions"]["m_loc_hard"]) == list(HARD)
    for layer in saved["layers"]:
        table = saved["per_layer"][str(layer)]
        assert set(table) == set(KEYS)
        for key, entry in table.items():
            similarity = entry["similarity"]
            assert {kind: len(v) for kind, v in similarity.items()} == saved["counts"]
            again = best_threshold([v for k in IN_SCOPE for v in similarity[k]],
                                   [v for k in OUT_OF_SCOPE for v in similarity[k]])
            assert (entry["tau"], entry["balanced_error"], entry["auroc"]) == (
                again.tau, again.balanced_error, again.auroc)
            assert 0.0 <= entry["balanced_error"] <= 0.5
            for kind in IN_SCOPE:
                assert entry["reject"][kind] == np.mean(np.array(similarity[kind]) < entry["tau"])
            for kind in OUT_OF_SCOPE:
                assert entry["accept"][kind] == np.mean(np.array(similarity[kind]) >= entry["tau"])
        errors = {key: table[key]["balanced_error"] for key in KEYS}
        assert errors[saved["best"][str(layer)]] == min(errors.values())
    top = saved["overall_best"]
    entry = saved["per_layer"][str(top["layer"])][top["key"]]
    assert (top["tau"], top["balanced_error"]) == (entry["tau"], entry["balanced_error"])
    assert top["balanced_error"] == min(
        t[k]["balanced_error"] for t in saved["per_layer"].values() for k in KEYS)
    assert set(QUERY_KINDS) == set(saved["counts"])


def test_figures_are_png(gate_run):
    names = [f"gate_hist_L{layer}.png" for layer in range(6)] + ["gate_error.png"]
    assert gate_run.result["figures"] == names
    for name in names:
        assert (gate_run.out / name).read_bytes()[:4] == b"\x89PNG", name


def test_chosen_layers_and_keys_and_bad_arguments(gate_run, tmp_path):
    result = run_gate(gate_run.data, tmp_path, layers=[3, 1, 3], keys=["prompt_end"],
                      progress=False)
    assert result["layers"] == [1, 3] and list(result["per_layer"]["1"]) == ["prompt_end"]
    assert list(result["per_layer"]["3"]) == ["prompt_end"]
    alone, every = (r["per_layer"]["3"]["prompt_end"] for r in (result, gate_run.result))
    for kind in QUERY_KINDS:  # the same states, up to float rounding
        assert alone["similarity"][kind] == pytest.approx(every["similarity"][kind], abs=1e-6)
    assert alone["balanced_error"] == pytest.approx(every["balanced_error"])
    with pytest.raises(ValueError, match="layer 6 is out of range"):
        run_gate(gate_run.data, tmp_path, layers=[6], progress=False)
    with pytest.raises(ValueError, match="layer -1 is out of range"):
        run_gate(gate_run.data, tmp_path, layers=[-1], progress=False)
    with pytest.raises(ValueError, match="'image_median'"):
        run_gate(gate_run.data, tmp_path, keys=["image_median"], progress=False)


def test_kind_threshold_weighs_every_input_kind_alike():
    from dualedit.analysis.gate import kind_threshold

    assert kind_threshold({"t_gen": [0.9], "v_gen": [0.8], "m_loc": [0.1], "t_loc": [0.2]}) == (
        0.5, 0.0)
    # One hard look-alike among easy negatives: the pooled balanced error lets it through at a
    # low tau, the per-kind mean (hard M-Loc a fifth of the error) raises tau above it.
    values = {"t_gen": [0.90, 0.95], "v_gen": [0.80, 0.85], "m_loc": [0.1, 0.2],
              "m_loc_hard": [0.70, 0.72], "t_loc": [0.2, 0.1]}
    tau, error = kind_threshold(values)
    assert 0.72 < tau < 0.80 and error == 0.0
    assert kind_threshold({**values, "m_loc_hard": [0.82, 0.83]}) == pytest.approx((0.84, 0.1))
    with pytest.raises(ValueError, match="in-scope and out-of-scope"):
        kind_threshold({"t_gen": [0.9], "m_loc": []})
