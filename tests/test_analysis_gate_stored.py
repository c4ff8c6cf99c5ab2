"""The gate analysis with every record's edit stored at once (`dualedit analyze gate --stored`):
the GRACE radii on hand-made unit vectors, the nearest-of-many scoring and threshold searches on
constructed similarities, the whole run on both tiny backbones (invariants against the pairwise
similarities of the same run, a re-scoring of the reported rates, the JSON and the figure), and
the command line flag."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_train_data import write_tiny_mmedit

from dualedit.analysis.figures import as_written, read_json
from dualedit.analysis.gate import KEYS, QUERY_KINDS, _similarities, run_gate
from dualedit.analysis.inputs import analysis_data
from dualedit.analysis.stored import (
    IMAGE_TAU_GRID,
    NO_CANDIDATE,
    TAU0_GRID,
    Nearest,
    best_image_first,
    best_radius,
    best_stored_tau,
    grace_thresholds,
    mean_rate,
    nearest,
    nearest_image_first,
    score_rule,
    stored_separation,
)
from dualedit.cli import build_parser, main
from dualedit.data.mmedit import MMEditDataset

PNG = b"\x89PNG"


def _circle(*angles: float) -> torch.Tensor:
    """Unit vectors in the plane at the given angles: [n, 2]."""
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles], dtype=torch.float64)


def _near(similarity, chosen, own) -> Nearest:
    return Nearest(np.asarray(similarity, dtype=np.float64), np.asarray(chosen),
                   np.asarray(own))


# -- the radius rule -------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [0.2, 0.5, 0.85])
def test_two_close_edits_with_other_targets_shrink_to_half_their_angle(theta):
    rho0 = math.acos(0.9)  # 0.451: they overlap while theta < 0.902
    thresholds = grace_thresholds(_circle(0.3, 0.3 + theta), "prompt_end", 0.9, ["cat", "dog"])
    assert thresholds == pytest.approx([math.cos(theta / 2)] * 2, abs=1e-6)
    assert theta < 2 * rho0 and thresholds[0] > 0.9


def test_same_target_or_far_apart_edits_keep_the_starting_radius():
    same = grace_thresholds(_circle(0.0, 0.2), "prompt_end", 0.9, ["cat", "cat"])
    far = grace_thresholds(_circle(0.0, 1.2), "prompt_end", 0.9, ["cat", "dog"])
    assert same == pytest.approx([0.9, 0.9]) and far == pytest.approx([0.9, 0.9])


def test_radii_shrink_in_insertion_order_against_the_current_radii():
    rho0 = math.acos(0.9)
    # A and B share a target; C clashes with both: each shrinks to half its angle to C.
    thresholds = grace_thresholds(_circle(0.0, 0.3, 0.7), "prompt_end", 0.9, ["a", "a", "c"])
    assert thresholds == pytest.approx([math.cos(0.35), math.cos(0.2), math.cos(0.2)], abs=1e-6)
    # A and B shrank to 0.1 first; C at 0.7 is then clear of A (0.7 > 0.1 + rho0) but not of B.
    assert 0.7 > 0.1 + rho0 > 0.5
    thresholds = grace_thresholds(_circle(0.0, 0.2, 0.7), "prompt_end", 0.9, ["a", "b", "c"])
    assert thresholds == pytest.approx([math.cos(0.1), math.cos(0.1), math.cos(0.25)], abs=1e-6)


def test_mean_keys_compare_normalised_means_and_targets_must_match_edits():
    edits = _circle(0.0, 0.4) * torch.tensor([[3.0], [0.5]], dtype=torch.float64)
    thresholds = grace_thresholds(edits, "text_mean", 0.9, ["a", "b"])
    assert thresholds == pytest.approx([math.cos(0.2)] * 2, abs=1e-6)
    with pytest.raises(ValueError, match="1 targets for 2 edits"):
        grace_thresholds(edits, "text_mean", 0.9, ["a"])


# -- nearest-of-many scoring -----------------------------------------------------------------------


def test_nearest_takes_the_most_similar_edit_and_a_zero_mean_scores_zero():
    edits = _circle(0.0, 1.0, 2.0).float()
    similarity, chosen = nearest(_circle(0.9, 2.3, 0.1).float(), edits, "prompt_end")
    assert chosen.tolist() == [1, 2, 0]
    assert similarity.tolist() == pytest.approx([math.cos(0.1), math.cos(0.3), math.cos(0.1)])
    similarity, _ = nearest(torch.zeros(1, 2), edits, "image_mean")  # no image
    assert similarity.tolist() == [0.0]
    with pytest.raises(ValueError, match="no stored edits"):
        nearest(edits, edits[:0], "prompt_end")


def test_generality_on_another_records_edit_is_wrong_even_above_tau():
    found = {
        "t_gen": _near([0.95, 0.90, 0.40], [1, 1, 2], [0, 1, 2]),  # wrong edit, right, closed
        "m_loc": _near([0.30, 0.70], [0, 1], [0, 1]),  # closed (right), open (wrong)
        "m_loc_hard": _near([], [], []),
    }
    assert score_rule(found, 0.5) == {"t_gen": pytest.approx(1 / 3), "m_loc": 0.5,
                                      "m_loc_hard": None}
    # Per-edit thresholds are read at the chosen edit.
    thresholds = np.array([0.2, 0.6, 0.35])  # the wrong edit's T-Gen opens and stays wrong
    assert score_rule(found, thresholds) == {"t_gen": pytest.approx(2 / 3), "m_loc": 0.0,
                                             "m_loc_hard": None}
    assert mean_rate(score_rule(found, 0.5)) == pytest.approx((1 / 3 + 0.5) / 2)


def test_best_tau_separates_a_separable_toy_case_perfectly():
    found = {
        "t_gen": _near([0.90, 0.95], [0, 1], [0, 1]),
        "v_gen": _near([0.85], [2], [2]),
        "m_loc": _near([0.20, 0.40], [0, 2], [0, 1]),
        "t_loc": _near([0.10], [1], [2]),
    }
    tau, mean, right = best_stored_tau(found)
    assert tau == pytest.approx(0.625) and mean == 1.0  # the midpoint of 0.40 and 0.85
    assert right == {"t_gen": 1.0, "v_gen": 1.0, "m_loc": 1.0, "t_loc": 1.0}


def test_best_tau_cannot_rescue_a_query_whose_nearest_edit_is_another():
    found = {"t_gen": _near([0.90, 0.95], [0, 0], [0, 1]), "m_loc": _near([0.30], [1], [0])}
    tau, mean, right = best_stored_tau(found)
    assert (tau, mean) == (pytest.approx(0.6), pytest.approx(0.75))
    assert right == {"t_gen": 0.5, "m_loc": 1.0}


def test_per_edit_radii_separate_what_one_tau_cannot():
    # Edit 0 (A) has a near neighbour with another target (edit 1, C, 0.6 away): its threshold
    # rises to cos(0.3) = 0.955, above A's look-alike M-Loc (0.93) and below its T-Gen (0.97).
    # Edit 2 (B) stands alone: its T-Gen at 0.86 needs a low threshold, which one tau cannot give
    # without opening for the M-Loc.
    edits = _circle(0.0, 0.6, 2.5).float()
    targets = ["a", "c", "b"]
    queries = _circle(-math.acos(0.97), 2.5 + math.acos(0.86), -math.acos(0.93)).float()
    similarity, chosen = nearest(queries, edits, "prompt_end")
    assert chosen.tolist() == [0, 2, 0]
    sim, pick = similarity.double().numpy(), chosen.numpy()
    found = {"t_gen": Nearest(sim[:2], pick[:2], np.array([0, 2])),
             "m_loc": Nearest(sim[2:], pick[2:], np.array([1]))}
    entry = stored_separation(found, edits, "prompt_end", targets)
    assert entry["tau"]["mean"] == pytest.approx(0.75) and entry["tau"]["tau"] == pytest.approx(
        0.95, abs=1e-6)
    radius = entry["radius"]
    # Perfect for every tau0 up to 0.86 (B's T-Gen): the middle of 0.80 .. 0.86.
    assert radius["tau0"] == pytest.approx(0.83) and radius["mean"] == 1.0
    assert radius["right"] == {"t_gen": 1.0, "m_loc": 1.0}
    assert radius["median_threshold"] == pytest.approx(math.cos(0.3), abs=1e-6)
    assert radius["shrunk"] == pytest.approx(2 / 3) and entry["stored"] == 3
    tau0, thresholds, mean, _ = best_radius(found, edits, "prompt_end", targets, [0.9])
    assert tau0 == 0.9 and mean == pytest.approx(0.75)  # B's T-Gen (0.86) stays closed
    assert thresholds == pytest.approx([math.cos(0.3), math.cos(0.3), 0.9], abs=1e-6)


# -- the analysis on the tiny backbones ------------------------------------------------------------

RECORDS = 6
SAME_REPHRASE = 0  # rephrase == src: its T-Gen sample is its edit sample
DUPLICATE = (1, 3)  # record 3 edits record 1's image and question to another target


def _dataset(root: Path) -> MMEditDataset:
    write_tiny_mmedit(root, n=RECORDS)
    path = root / "vqa" / "vqa_train.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw[SAME_REPHRASE]["rephrase"] = raw[SAME_REPHRASE]["src"]
    first, copy = DUPLICATE
    raw[copy].update(image=raw[first]["image"], src=raw[first]["src"])
    assert raw[copy]["alt"] != raw[first]["alt"]
    path.write_text(json.dumps(raw), encoding="utf-8")
    return MMEditDataset(path)


@pytest.fixture(scope="module")
def stored_run(tiny_vlm, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gate_stored_{tiny_vlm.name}")
    data = analysis_data(tiny_vlm.model, tiny_vlm.processor, _dataset(root / "data"))
    result = run_gate(data, root / "out", batch_size=4, progress=False, stored=True)
    similarity, positions, log = _similarities(data, result["layers"], tuple(KEYS), 4, False,
                                               True)
    return SimpleNamespace(data=data, result=result, out=root / "out", similarity=similarity,
                           positions=positions, log=log,
                           targets=[record.alt for record in data.records])


def test_stored_section_layout_rates_and_figure(stored_run):
    result = stored_run.result
    section = result["stored"]
    assert set(section) == {"notes", "edits", "tau0_grid", "image_tau_grid", "per_layer",
                            "best"}
    assert section["image_tau_grid"] == list(IMAGE_TAU_GRID)
    assert section["edits"] == RECORDS and "split" in section["notes"]
    assert section["tau0_grid"] == sorted(TAU0_GRID)
    assert list(section["per_layer"]) == [str(layer) for layer in range(6)]
    means = {"tau": [], "radius": []}
    for table in section["per_layer"].values():
        assert list(table) == list(KEYS)
        for entry in table.values():
            assert entry["stored"] == RECORDS
            assert set(entry["tau"]) == {"tau", "mean", "right"}
            assert set(entry["radius"]) == {"tau0", "median_threshold", "shrunk", "mean", "right"}
            for rule in means:
                right = entry[rule]["right"]
                assert list(right) == list(QUERY_KINDS) and right["m_loc_hard"] is None
                present = [right[k] for k in QUERY_KINDS if k != "m_loc_hard"]
                assert all(0.0 <= rate <= 1.0 for rate in present)
                assert entry[rule]["mean"] == pytest.approx(np.mean(present))
                means[rule].append(entry[rule]["mean"])
            assert -1.0 <= entry["radius"]["median_threshold"] <= 1.0
    for table in section["per_layer"].values():
        for key, entry in table.items():
            # The image-first rule exists exactly for the keys of the prompt end and an image.
            assert ("image_first" in entry) == (key in IMAGE_FIRST_KEYS), key
            if key in IMAGE_FIRST_KEYS:
                first = entry["image_first"]
                assert set(first) == {"image_tau", "tau", "mean", "right"}
                assert first["image_tau"] in IMAGE_TAU_GRID and 0.0 <= first["mean"] <= 1.0
    best = section["best"]["image_first"]
    assert best["key"] in IMAGE_FIRST_KEYS and best["mean"] == max(
        entry["image_first"]["mean"] for table in section["per_layer"].values()
        for entry in table.values() if "image_first" in entry)
    for rule, fields in (("tau", {"tau"}), ("radius", {"tau0", "median_threshold"})):
        best = section["best"][rule]
        assert set(best) == {"layer", "key", "mean"} | fields
        assert best["mean"] == max(means[rule])
        entry = section["per_layer"][str(best["layer"])][best["key"]][rule]
        assert all(best[name] == entry[name] for name in fields | {"mean"})
    assert result["figures"][-1] == "gate_stored.png"
    assert (stored_run.out / "gate_stored.png").read_bytes()[:4] == PNG
    saved = read_json(stored_run.out / "gate.json")
    assert saved["stored"] == as_written(section)
    assert saved["per_layer"] == as_written(result["per_layer"])  # the pairwise part as before


IMAGE_FIRST_KEYS = ("prompt_end_image", "prompt_end_and_image", "prompt_end_image_groups")


def test_image_first_without_a_filter_is_the_nearest_by_question(stored_run):
    """At image_tau -1 every edit is a candidate: the choice is the prompt-end key's."""
    log = stored_run.log
    for layer in range(6):
        plain = log.found(layer, "prompt_end")
        for key in IMAGE_FIRST_KEYS:
            first = log.found(layer, key, -1.0)
            for kind in QUERY_KINDS:
                if not plain[kind].similarity.size:
                    continue  # a kind without queries (no hard M-Loc here)
                assert first[kind].similarity == pytest.approx(plain[kind].similarity, abs=1e-5)
                # the same edit, or one as near (ties in float)
                same = first[kind].chosen == plain[kind].chosen
                assert same.mean() >= 0.9, (layer, key, kind)


def test_image_first_filters_on_the_picture_then_picks_by_question():
    edits_image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # edit 0 shows A, edit 1 shows B
    edits_question = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    # A rephrased picture of A asking edit 0's question: nearer to edit 1 by question alone
    # after noise, but the picture filter keeps only edit 0.
    query_image = torch.tensor([[0.96, 0.28]])
    query_question = torch.tensor([[0.8, 0.6]])
    edits = (edits_image, edits_question)
    sim, chosen = nearest_image_first((query_image, query_question), edits, -1.0)
    assert chosen.tolist() == [1] and float(sim) == pytest.approx(1.0)
    sim, chosen = nearest_image_first((query_image, query_question), edits, 0.9)
    assert chosen.tolist() == [0] and float(sim) == pytest.approx(0.8)
    sim, chosen = nearest_image_first((torch.tensor([[-1.0, 0.0]]), query_question), edits, 0.5)
    assert chosen.tolist() == [-1] and float(sim) == NO_CANDIDATE  # no picture matches: closed
    # The search picks the filter that makes the rephrased picture find its own edit.
    found = {}
    for image_tau in (-1.0, 0.9):
        s, c = nearest_image_first((query_image, query_question), edits, image_tau)
        loc_s, loc_c = nearest_image_first((torch.tensor([[0.0, 1.0]]), torch.tensor(
            [[0.0, 1.0]])), edits, image_tau)  # B's picture, another question: stays closed
        found[image_tau] = {"v_gen": _near(s.numpy(), c.numpy(), [0]),
                            "m_loc": _near(loc_s.numpy(), loc_c.numpy(), [0])}
    best = best_image_first(found)
    assert best["image_tau"] == 0.9 and best["mean"] == 1.0
    assert best["right"] == {"v_gen": 1.0, "m_loc": 1.0}


def test_nearest_is_at_least_the_own_edit_and_equal_when_it_is_the_own(stored_run):
    log, similarity, positions = stored_run.log, stored_run.similarity, stored_run.positions
    for layer in range(6):
        for key in KEYS:
            found = log.found(layer, key)
            for kind in QUERY_KINDS:
                near, own = found[kind], np.array(similarity[layer][key][kind])
                assert near.own.tolist() == positions[kind]
                assert (near.similarity >= own - 1e-5).all(), (layer, key, kind)
                same = near.chosen == near.own
                assert near.similarity[same] == pytest.approx(own[same], abs=1e-5)
            t_gen = found["t_gen"]
            row = t_gen.own.tolist().index(SAME_REPHRASE)  # the edit sample itself
            assert t_gen.similarity[row] == pytest.approx(1.0, abs=1e-5), (layer, key)
            assert t_gen.chosen[row] == SAME_REPHRASE, (layer, key)
            if key == "image_mean":  # text-only queries: no image, cosine 0 with every edit
                assert found["t_loc"].similarity.tolist() == [0.0] * RECORDS


def test_reported_rates_rescore_from_the_nearest_edits(stored_run):
    log, targets, section = stored_run.log, stored_run.targets, stored_run.result["stored"]
    for layer in range(6):
        for key in KEYS:
            found, entry = log.found(layer, key), section["per_layer"][str(layer)][key]
            tau = entry["tau"]["tau"]
            assert entry["tau"]["right"] == pytest.approx(score_rule(found, tau), abs=1e-9)
            for other in np.concatenate([n.similarity for n in found.values()]):
                assert mean_rate(score_rule(found, other)) <= entry["tau"]["mean"] + 1e-12
            vectors = log.stored_vectors(layer, key)
            radius = entry["radius"]
            thresholds = grace_thresholds(vectors, key, radius["tau0"], targets)
            assert radius["right"] == pytest.approx(score_rule(found, thresholds), abs=1e-9)
            assert radius["median_threshold"] == pytest.approx(float(np.median(thresholds)))
            for tau0 in TAU0_GRID:
                other = score_rule(found, grace_thresholds(vectors, key, tau0, targets))
                assert mean_rate(other) <= radius["mean"] + 1e-12


def test_a_duplicated_question_with_another_target_closes_both_balls(stored_run):
    # Edits 1 and 3: same image and question, other targets: the prompt-end keys coincide, so
    # each one's radius shrinks to (about) zero and its threshold to (about) 1.
    log, targets = stored_run.log, stored_run.targets
    for layer in range(6):
        vectors = log.stored_vectors(layer, "prompt_end")
        for tau0 in (0.8, 0.95):
            thresholds = grace_thresholds(vectors, "prompt_end", tau0, targets)
            assert thresholds[list(DUPLICATE)] == pytest.approx([1.0, 1.0], abs=1e-4)


def test_default_run_has_no_stored_section(stored_run, tmp_path):
    result = run_gate(stored_run.data, tmp_path, layers=[2], keys=["prompt_end"],
                      progress=False)
    assert "stored" not in result and "stored" not in read_json(tmp_path / "gate.json")
    assert not (tmp_path / "gate_stored.png").exists()


# -- the command line ------------------------------------------------------------------------------


def test_stored_flag_parses_and_runs_from_the_command_line(tiny_factory, tmp_path, capsys):
    base = ["analyze", "gate", "--model", "m", "--data", "d", "--out", "o"]
    assert build_parser().parse_args(base).stored is False
    assert build_parser().parse_args(base + ["--stored"]).stored is True
    model, processor = tiny_factory("llava")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    write_tiny_mmedit(tmp_path / "data", n=RECORDS)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["-q", "analyze", "gate", "--model", str(tmp_path / "model"), "--data",
                 str(tmp_path / "data"), "--out", str(out), "--layers", "1", "3", "--keys",
                 "prompt_end", "text_mean", "--stored", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"{RECORDS} edits stored" in printed and "per-edit radius best" in printed
    section = read_json(out / "gate.json")["stored"]
    assert list(section["per_layer"]) == ["1", "3"]
    assert list(section["per_layer"]["1"]) == ["prompt_end", "text_mean"]
    assert (out / "gate_stored.png").read_bytes()[:4] == PNG
