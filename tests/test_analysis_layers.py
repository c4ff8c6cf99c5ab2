"""The layer sweep (`dualedit analyze layers`), the recommendation drawn from the analyses
(`dualedit analyze recommend`) and `dualedit train --from-recommendation`: tiny models, one
training step per variant, and hand-written analysis files with known answers."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_data import write_tiny_mmedit

from dualedit.analysis.figures import write_json
from dualedit.analysis.layers import run_layer_sweep, sweep_variants
from dualedit.analysis.recommend import recommend, recommendation_options
from dualedit.cli import main
from dualedit.train import TrainSettings

PNG = b"\x89PNG"
TINY = TrainSettings(lr=1e-3, batch_size=2, max_steps=1, eval_every=1, val_edits=2,
                     checkpoint_every=1)


def test_sweep_variants_cover_single_layers_and_ordered_pairs():
    variants = sweep_variants(3)
    names = [v.name for v in variants]
    assert names[:6] == ["text-0", "text-1", "text-2", "visual-0", "visual-1", "visual-2"]
    assert names[6:] == ["pair-0-0", "pair-0-1", "pair-0-2", "pair-1-1", "pair-1-2", "pair-2-2"]
    text, visual = variants[1], variants[4]
    assert text.options() == {"text_layer": 1, "visual_layer": 1, "use_visual": False}
    assert visual.options() == {"text_layer": 1, "visual_layer": 1, "use_text": False}
    assert [v.name for v in sweep_variants(6, ["pairs"], [4, 2])] == ["pair-2-2", "pair-2-4",
                                                                     "pair-4-4"]
    with pytest.raises(ValueError, match="layers"):
        sweep_variants(3, layers=[3])
    with pytest.raises(ValueError, match="sweeps"):
        sweep_variants(3, ["diagonal"])


def test_layer_sweep_trains_scores_and_reuses_its_cells(tiny_vlm, tiny_factory, tmp_path,
                                                         monkeypatch):
    model, processor = tiny_factory(tiny_vlm.name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = tmp_path / "data"
    write_tiny_mmedit(data, n=8)
    out = tmp_path / "sweep"
    result = run_layer_sweep(model, processor, data, out, layers=[1, 2], settings=TINY,
                             options={"width": 8, "heads": 2}, progress=False)
    names = [row["variant"] for row in result["variants"]]
    assert names == ["text-1", "text-2", "visual-1", "visual-2", "pair-1-1", "pair-1-2",
                     "pair-2-2"]
    for row in result["variants"]:
        assert set(row["scores"]) >= {"rel", "t_gen", "v_gen", "t_loc", "m_loc", "avg"}
        assert all(0.0 <= row["scores"][k] <= 100.0 for k in ("rel", "t_loc", "m_loc"))
        saved = json.loads((out / "layers-runs" / row["variant"] / "best" /
                            "adapter_config.json").read_text())["config"]
        assert (saved["text_layer"], saved["visual_layer"]) == (row["text_layer"],
                                                                row["visual_layer"])
        assert saved["use_visual"] == (row["kind"] != "text")
        assert saved["use_text"] == (row["kind"] != "visual")
    # Scored with the gate off: an adapter at the first layers moves locality answers too.
    assert json.loads((out / "layers.json").read_text())["gate"] is False
    for name in ("layers_table1.png", "layers_heatmap.png"):
        assert (out / name).read_bytes()[:4] == PNG
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # A rerun with the same settings reuses every cell: no training, no scoring.
    import dualedit.analysis.layers as layers

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(layers, "train_and_score", refuse)
    again = run_layer_sweep(model, processor, data, out, layers=[1, 2], settings=TINY,
                            options={"width": 8, "heads": 2}, progress=False)
    assert [r["scores"] for r in again["variants"]] == [r["scores"] for r in result["variants"]]


def _row(kind, t, v, rel, gen, avg):
    return {"variant": f"{kind}-{t}-{v}", "kind": kind, "text_layer": t, "visual_layer": v,
            "scores": {"rel": rel, "t_gen": gen, "v_gen": gen, "t_loc": 100.0, "m_loc": 50.0,
                       "avg": avg}}


def _gate_file(path, layer, errors):
    per_key = {key: {"tau": 0.5 + i / 10, "balanced_error": err, "auroc": 1 - err}
               for i, (key, err) in enumerate(errors.items())}
    write_json(path, {"analysis": "gate", "layers": [0, 1, 2, 3], "per_layer": {
        str(layer): per_key}})


def test_recommend_takes_the_best_pair_and_the_gate_key_with_the_lowest_error(tmp_path):
    write_json(tmp_path / "layers.json", {"analysis": "layers", "depth": 4, "variants": [
        _row("pair", 0, 1, 90.0, 80.0, 85.0),
        _row("pair", 1, 2, 95.0, 90.0, 88.0),   # best edit score 91.67
        _row("pair", 2, 3, 95.4, 90.0, 80.0),   # 91.8: a tie within a point, lower Avg
        _row("text", 0, 0, 99.0, 99.0, 99.0),   # single rows do not compete with pairs
    ]})
    _gate_file(tmp_path / "gate.json", 1, {"prompt_end": 0.2, "prompt_end_image": 0.05,
                                           "last_position": 0.01, "text_mean": 0.0})
    result = recommend(tmp_path)
    assert result["recommendation"] == {"text_layer": 1, "visual_layer": 2,
                                        "gate_key": "prompt_end_image", "tau": 0.6}
    assert (tmp_path / "recommendation.png").read_bytes()[:4] == PNG
    assert recommendation_options(tmp_path / "recommendation.json") == result["recommendation"]
    # The released code's key reads the answer under teacher forcing: only when asked for.
    allowed = recommend(tmp_path, allow_last_position=True)["recommendation"]
    assert allowed["gate_key"] == "last_position"


def test_recommend_falls_back_to_single_layers_then_noise_then_the_paper_ratio(tmp_path):
    single = tmp_path / "single"
    write_json(single / "layers.json", {"analysis": "layers", "depth": 6, "variants": [
        _row("text", 3, 3, 90.0, 90.0, 90.0), _row("text", 1, 1, 50.0, 50.0, 50.0),
        _row("visual", 1, 1, 99.0, 99.0, 99.0), _row("visual", 4, 4, 80.0, 80.0, 80.0),
    ]})
    chosen = recommend(single)["recommendation"]
    assert (chosen["text_layer"], chosen["visual_layer"]) == (3, 4)  # visual at or above text
    assert chosen["gate_key"] is None and chosen["tau"] is None  # no gate analysis
    assert recommendation_options(single / "recommendation.json") == {"text_layer": 3,
                                                                       "visual_layer": 4}
    noise = tmp_path / "noise"
    entries = [{"layer": layer, "modality": modality, "sigma": sigma,
                "kl_mean": kl(layer, modality) * sigma}
               for layer in range(6) for modality in ("text", "image", "all")
               for sigma in (0.5, 1.0, 2.0)
               for kl in [lambda l, m: {"text": [1, 5, 2, 1, 1, 1], "image": [9, 1, 1, 3, 1, 1],
                                        "all": [1] * 6}[m][l]]]
    write_json(noise / "noise.json", {"analysis": "noise", "layers": list(range(6)),
                                      "per_layer": entries})
    chosen = recommend(noise)["recommendation"]
    assert (chosen["text_layer"], chosen["visual_layer"]) == (1, 3)
    with pytest.raises(FileNotFoundError, match="no analysis results"):
        recommend(tmp_path / "empty")


def test_a_bad_recommendation_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "recommendation.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="recommendation.json"):
        recommendation_options(path)
    write_json(path, {"analysis": "recommend", "method": "dualedit",
                      "recommendation": {"text_layer": 1, "layer": 2}})
    with pytest.raises(ValueError, match="unknown recommendation fields"):
        recommendation_options(path)
    write_json(path, {"analysis": "recommend", "method": "dualedit",
                      "recommendation": {"text_layer": 1}})
    with pytest.raises(ValueError, match="not for the method 'mend'"):
        recommendation_options(path, method="mend")


def test_analyze_layers_recommend_and_train_from_the_command_line(tiny_factory, tmp_path,
                                                                  capsys):
    model, processor = tiny_factory("llava")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data = tmp_path / "data"
    write_tiny_mmedit(data, n=8)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"val_edits": 2, "batch_size": 2, "checkpoint_every": 1}))
    out = tmp_path / "analysis"
    assert main(["-q", "analyze", "layers", "--model", str(model_dir), "--data", str(data),
                 "--out", str(out), "--sweeps", "pairs", "--layers", "2", "3", "--steps", "1",
                 "--settings", str(settings), "--quiet"]) == 0
    swept = json.loads((out / "layers.json").read_text())
    assert swept["train_settings"]["max_steps"] == 1 and swept["train_settings"]["lr"] == 5e-3
    assert main(["-q", "analyze", "recommend", "--out", str(out)]) == 0
    chosen = json.loads((out / "recommendation.json").read_text())["recommendation"]
    best = max(swept["variants"], key=lambda r: sum(r["scores"][k] for k in
                                                    ("rel", "t_gen", "v_gen")))
    assert chosen["text_layer"] in (2, 3) and chosen["visual_layer"] >= chosen["text_layer"]
    assert abs(sum(best["scores"][k] for k in ("rel", "t_gen", "v_gen")) / 3 - max(
        sum(r["scores"][k] for k in ("rel", "t_gen", "v_gen")) / 3 for r in swept["variants"]
        if (r["text_layer"], r["visual_layer"]) == (chosen["text_layer"],
                                                    chosen["visual_layer"]))) <= 1.0
    run = tmp_path / "run"
    assert main(["-q", "train", "--method", "dualedit", "--model", str(model_dir), "--data",
                 str(data), "--out", str(run), "--from-recommendation",
                 str(out / "recommendation.json"), "--option", "visual_layer=4", "--option",
                 "width=8", "--option", "heads=2", "--steps", "1", "--eval-every", "1",
                 "--settings", str(settings)]) == 0
    saved = json.loads((run / "best" / "adapter_config.json").read_text())["config"]
    assert saved["text_layer"] == chosen["text_layer"] and saved["visual_layer"] == 4
    code = main(["train", "--method", "mend", "--model", str(model_dir), "--data", str(data),
                 "--out", str(tmp_path / "m"), "--from-recommendation",
                 str(out / "recommendation.json")])
    assert code != 0
    assert "not for the method 'mend'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_recommend_reads_each_analysis_from_the_first_folder_that_has_it(tmp_path):
    sweep, gates = tmp_path / "vqa", tmp_path / "caption"
    write_json(sweep / "layers.json", {"analysis": "layers", "depth": 4, "variants": [
        _row("pair", 1, 2, 95.0, 90.0, 88.0)]})
    _gate_file(sweep / "gate.json", 1, {"prompt_end": 0.01})
    _gate_file(gates / "gate.json", 1, {"prompt_end": 0.3, "prompt_end_image": 0.1})
    result = recommend([gates, sweep], out_dir=tmp_path / "out")
    assert result["recommendation"] == {"text_layer": 1, "visual_layer": 2,
                                        "gate_key": "prompt_end_image", "tau": 0.6}
    assert result["inputs"] == sorted([str(sweep / "layers.json"), str(gates / "gate.json")])
    assert (tmp_path / "out" / "recommendation.json").is_file()
    # A sweep of a 4-layer model beside a gate analysis of a deeper one is refused.
    write_json(gates / "gate.json", {"analysis": "gate", "layers": [0, 7], "per_layer": {}})
    with pytest.raises(ValueError, match="different depths"):
        recommend([gates, sweep])


def test_recommend_prefers_the_per_kind_criterion_when_the_gate_file_has_it(tmp_path):
    write_json(tmp_path / "layers.json", {"analysis": "layers", "depth": 4, "variants": [
        _row("pair", 1, 2, 95.0, 90.0, 88.0)]})
    per_key = {"prompt_end": {"tau": 0.5, "balanced_error": 0.01, "tau_kinds": 0.7,
                              "kind_error": 0.2},
               "prompt_end_image": {"tau": 0.6, "balanced_error": 0.05, "tau_kinds": 0.8,
                                    "kind_error": 0.1}}
    write_json(tmp_path / "gate.json", {"analysis": "gate", "layers": [0, 1, 2, 3],
                                        "per_layer": {"1": per_key}})
    chosen = recommend(tmp_path)["recommendation"]
    assert (chosen["gate_key"], chosen["tau"]) == ("prompt_end_image", 0.8)


# -- the finalists stage ----------------------------------------------------------------------


def test_finalists_are_the_sweeps_best_pairs_and_the_included_ones():
    from dualedit.analysis.finalists import finalist_pairs

    sweep = {"depth": 4, "variants": [
        _row("pair", 0, 1, 70.0, 70.0, 70.0), _row("pair", 1, 2, 95.0, 90.0, 88.0),
        _row("pair", 2, 3, 80.0, 80.0, 80.0), _row("text", 0, 0, 99.0, 99.0, 99.0)]}
    rows = finalist_pairs(sweep, 2, [(0, 1)])
    assert [(r["text_layer"], r["visual_layer"], r["sweep_rank"], r["included"]) for r in rows] \
        == [(1, 2, 1, False), (2, 3, 2, False), (0, 1, 3, True)]
    # An included pair among the best is not trained twice; one never swept has no rank.
    rows = finalist_pairs(sweep, 2, [(1, 2), (0, 3)])
    assert [(r["text_layer"], r["visual_layer"], r["sweep_rank"], r["included"]) for r in rows] \
        == [(1, 2, 1, True), (2, 3, 2, False), (0, 3, None, True)]
    with pytest.raises(ValueError, match="text <= visual"):
        finalist_pairs(sweep, 1, [(2, 1)])
    with pytest.raises(ValueError, match="text <= visual"):
        finalist_pairs(sweep, 1, [(0, 4)])
    with pytest.raises(ValueError, match="no scored pairs"):
        finalist_pairs({"depth": 4, "variants": [_row("text", 0, 0, 1.0, 1.0, 1.0)]}, 1)


def _final(t, v, score, included):
    return {**_row("pair", t, v, score, score, score), "variant": f"pair-{t}-{v}",
            "included": included}


def test_an_included_pair_is_kept_unless_beaten_by_more_than_a_point():
    from dualedit.analysis.finalists import choose_finalist

    chosen, reason = choose_finalist([_final(0, 3, 97.0, False), _final(0, 1, 96.5, True)])
    assert (chosen["text_layer"], chosen["visual_layer"]) == (0, 1)
    assert "within 1 point" in reason
    chosen, _ = choose_finalist([_final(0, 3, 97.6, False), _final(0, 1, 96.5, True)])
    assert (chosen["text_layer"], chosen["visual_layer"]) == (0, 3)
    chosen, _ = choose_finalist([_final(0, 3, 90.0, False), _final(1, 1, 95.0, False)])
    assert (chosen["text_layer"], chosen["visual_layer"]) == (1, 1)
    with pytest.raises(ValueError):
        choose_finalist([])


def test_analyze_finalists_trains_them_and_recommend_takes_the_chosen_pair(tiny_factory,
                                                                           tmp_path):
    model, processor = tiny_factory("blip2")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data = tmp_path / "data"
    write_tiny_mmedit(data, n=8)
    sweep = tmp_path / "sweep"
    # A sweep of another task narrows the pairs; the finalists train on --task.
    write_json(sweep / "layers.json", {"analysis": "layers", "depth": 6, "task": "caption",
                                       "train_settings": {"max_steps": 150}, "variants": [
        _row("pair", 2, 3, 95.0, 90.0, 88.0), _row("pair", 1, 1, 50.0, 50.0, 50.0)]})
    keys = {"prompt_end": {"tau": 0.5, "balanced_error": 0.2},
            "prompt_end_image": {"tau": 0.7, "balanced_error": 0.05}}
    write_json(sweep / "gate.json", {"analysis": "gate", "layers": [2, 3],
                                     "per_layer": {"2": keys, "3": keys}})
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"val_edits": 2, "batch_size": 2, "checkpoint_every": 1,
                                    "eval_every": 1}))
    out = tmp_path / "finalists"
    args = ["-q", "analyze", "finalists", "--model", str(model_dir), "--data", str(data),
            "--task", "vqa", "--sweep", str(sweep), "--out", str(out), "--top", "1",
            "--include", "3", "3", "--steps", "1", "--settings", str(settings), "--quiet"]
    assert main(args) == 0
    result = json.loads((out / "finalists.json").read_text())
    assert result["task"] == "vqa" and result["sweep_task"] == "caption"
    assert result["train_settings"]["max_steps"] == 1
    assert [(r["text_layer"], r["visual_layer"], r["included"]) for r in result["finalists"]] \
        == [(2, 3, False), (3, 3, True)]
    for row in result["finalists"]:
        saved = json.loads((out / "finalists-runs" / row["variant"] / "best" /
                            "adapter_config.json").read_text())["config"]
        assert (saved["text_layer"], saved["visual_layer"]) == (row["text_layer"],
                                                                row["visual_layer"])
    assert (out / "finalists.png").read_bytes()[:4] == PNG
    chosen = result["chosen"]
    assert result["finalists"][[r["variant"] for r in result["finalists"]].index(
        chosen["variant"])]["editor"] == chosen["editor"]
    # recommend reads the finalists before the sweep, and names the trained adapters.
    assert main(["-q", "analyze", "recommend", "--out", str(out), "--from", str(out),
                 str(sweep)]) == 0
    rec = json.loads((out / "recommendation.json").read_text())
    assert (rec["recommendation"]["text_layer"], rec["recommendation"]["visual_layer"]) == (
        chosen["text_layer"], chosen["visual_layer"])
    assert rec["trained_editor"] == chosen["editor"] and "finalists" in rec["evidence"]
    assert rec["recommendation"]["gate_key"] == "prompt_end_image"
    # A second run reuses every scored finalist.
    import dualedit.analysis.layers as layers

    def refuse(*a, **k):
        raise AssertionError("a scored finalist was trained again")

    original = layers.train_and_score
    layers.train_and_score = refuse
    try:
        assert main(args) == 0
    finally:
        layers.train_and_score = original
