"""`dualedit bench ablations` (the paper's Table 3): the layer mapping by depth fraction, the
rows it makes, and a tiny end-to-end run whose cells train each variant apart (the gate rows of
the recipe's layers share one training), evaluate the layer rows without the gate, and are
reused on a rerun."""

from __future__ import annotations

import json

import pytest
from test_demo import PRETRAIN, WORLD

import dualedit.bench.cells as cells_module
from dualedit.bench.ablations import PAPER_PAIRS, ablations, map_layer, run_ablation_bench
from dualedit.cli import main
from dualedit.train import TrainSettings

RUN_EVAL = cells_module.run_eval
RECIPE = {"text_layer": 0, "visual_layer": 1}
TINY_TRAIN = TrainSettings(batch_size=1, max_steps=2, eval_every=2, val_edits=1, log_every=1)


def test_paper_layers_map_by_depth_fraction():
    assert [map_layer(layer, 32) for layer in (1, 2, 16, 19, 30)] == [1, 2, 16, 19, 30]
    assert [map_layer(layer, 6) for layer in (1, 2, 5, 10, 16, 19, 30)] == [0, 0, 1, 2, 3, 4, 5]
    assert map_layer(31, 6) == 5  # capped at the last layer


def test_rows_of_a_six_layer_model():
    rows = ablations(6, RECIPE)
    pairs = [r for r in rows if r.name.startswith("pair-")]
    # (1,2) and (2,2) both become (0,0) on 6 layers: one row, trained once, naming both.
    assert [r.name for r in pairs] == ["pair-0-0", "pair-1-1", "pair-2-2", "pair-5-5", "pair-3-4"]
    assert pairs[0].paper == "(1,2) (2,2)"
    assert all(r.eval_options == {"gate": False} for r in pairs)
    # Trained with the gate off too: no learned gate heads are fitted for rows that never gate.
    assert all(r.train_options["gate"] is False for r in pairs)
    assert all(r.train_name == r.name for r in pairs)
    by_name = {r.name: r for r in rows}
    assert by_name["text-only"].train_options == {"use_visual": False}
    assert by_name["visual-only"].train_options == {"use_text": False}
    # The gate rows at the recipe's layers: one training (the recipe's own run), two scorings.
    assert by_name["both"].train_name is None and by_name["both-nogate"].train_name is None
    assert by_name["both-nogate"].eval_options == {"gate": False}
    assert len(ablations(32, RECIPE)) == len(PAPER_PAIRS) + 4


def test_a_tiny_ablation_run_trains_each_variant_and_reuses_its_cells(
    tmp_path, tmp_path_factory, monkeypatch
):
    cache = tmp_path_factory.mktemp("ablation-cache")
    out = tmp_path / "out"
    calls = []

    def spy(**kwargs):
        calls.append((kwargs["editor_dir"], kwargs["editor_options"]))
        return RUN_EVAL(**kwargs)

    monkeypatch.setattr(cells_module, "run_eval", spy)
    kwargs = dict(backbones=["llava"], datasets=["vqa"], limit=2, cache_dir=cache,
                  progress=False, world_options=WORLD, pretrain_options=PRETRAIN,
                  train_settings=TINY_TRAIN)
    table = run_ablation_bench(out, **kwargs)
    summary = json.loads((out / "results.json").read_text())
    names = [row["variant"] for row in summary["rows"]]
    assert names == [r.name for r in ablations(6, RECIPE)]
    assert table.count("\n") == len(names) + 2
    trained = {row["variant"]: cell["trained"]["path"]
               for row, cell in zip(summary["rows"], summary["cells"])}
    assert trained["both"] == trained["both-nogate"]
    assert trained["both"].endswith("llava-vqa-seed0/best")
    assert trained["pair-3-4"].endswith("llava-vqa-seed0-pair-3-4/best")
    assert len(set(trained.values())) == len(names) - 1
    options = dict(zip(names, (opts for _, opts in calls)))
    assert options["pair-0-0"] == {"gate": False} and options["both"] is None
    saved = json.loads((cache / "trained" / "dualedit" / "llava-vqa-seed0-text-only" / "best"
                        / "adapter_config.json").read_text())
    assert saved["config"]["use_visual"] is False and saved["config"]["text_layer"] == 0
    assert saved["config"]["gate_key"] == "learned" and "gate_heads" in saved
    ungated = json.loads((cache / "trained" / "dualedit" / "llava-vqa-seed0-pair-3-4" / "best"
                          / "adapter_config.json").read_text())
    assert ungated["config"]["gate_key"] != "learned" and "gate_heads" not in ungated
    calls.clear()
    assert run_ablation_bench(out, **kwargs) == table
    assert calls == []  # every cell reused from its file


def test_the_command_line_refuses_an_unknown_backbone(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "ablations", "--out", "x", "--backbones", "qwen"])
