"""The sequential protocol's figures (metrics against N): which files, which lines, which
numbers on them, from results dicts built by hand in the two real layouts (`dualedit eval`'s
and `dualedit bench quality`'s), and `dualedit eval --protocol sequential` on the tiny models."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from test_train_data import write_tiny_mmedit

import dualedit.eval.sequential_curves as curves
from dualedit.cli import main
from dualedit.eval.sequential_curves import (
    sequential_points,
    write_sequential_curves,
    write_sequential_curves_of,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PAPER = ("rel", "t_gen", "v_gen", "t_loc", "m_loc")


def _means(base: float, hard: bool = True) -> dict[str, float]:
    """Distinct values per metric (rel = base, t_gen = base + 1, ...), avg and gen_em too."""
    means = {key: base + k for k, key in enumerate(PAPER)}
    if hard:
        means["m_loc_hard"] = base + 5
    return {**means, "avg": 50.0, "gen_em": 7.0}


def _eval_results(protocol: str = "sequential", ns=(1, 10, 100)) -> dict:
    """A `dualedit eval` results.json (`results_dict`) of ft-l on a model folder `tiny-llava`."""
    runs = [
        {"n_edits": None if protocol == "single" else n, "means": _means(10.0 * k),
         "records": [{"index": i, "rel": 1.0} for i in range(n)], "wall_s": 1.0,
         "records_per_s": 1.0}
        for k, n in enumerate(ns)
    ]
    return {
        "method": "ft-l", "editor_options": {"steps": 2},
        "backbone": {"model_type": "llava", "name_or_path": "models/tiny-llava/"},
        "dataset": {"path": "w/vqa/vqa_eval.json", "task": "vqa", "split": "eval", "n": 100},
        "protocol": protocol, "scorer": "paper", "prompt_protocol": {}, "settings": {},
        "versions": {"dualedit": "0.1.0"}, "time": "2025-01-01T00:00:00", "runs": runs,
        "wall_s": 3.0, "records_per_s": 1.0,
        "units": "records[*][metric] are fractions in [0, 1]; means are percentages",
    }


def _row(method, backbone, dataset, n, mean, std=None, status="done") -> dict:
    return {"method": method, "backbone": backbone, "dataset": dataset, "n_edits": n,
            "status": status, "seeds": [0], "per_seed": {"0": mean}, "mean": mean,
            "std": std or {key: None for key in mean}, "count": {key: 1 for key in mean}}


def _bench_results(methods=("none", "dualedit"), protocol="sequential", seeds=(0,)) -> dict:
    """A `dualedit bench quality` results.json: both backbones x both datasets; the caption
    cells have no hard M-Loc (None, as bench_rows writes it) and one N fewer; a skipped method."""
    rows = []
    for dataset, ns in (("vqa", (1, 10, 200)), ("caption", (1, 48))):
        for backbone in ("llava", "blip2"):
            for m, method in enumerate(methods):
                for k, n in enumerate(ns):
                    mean = _means(20.0 * m + k, hard=dataset == "vqa")
                    if dataset == "caption":
                        mean["m_loc_hard"] = None
                    std = {key: 1.5 for key in mean} if len(seeds) > 1 else None
                    rows.append(_row(method, backbone, dataset,
                                     n if protocol == "sequential" else None, mean, std))
            rows.append({**_row("ke", backbone, dataset, None, {}), "status": "skipped",
                         "reasons": {"0": "cannot hold many edits"}})
    return {
        "settings": {"methods": [*methods, "ke"], "backbones": ["llava", "blip2"],
                     "datasets": ["vqa", "caption"], "protocol": protocol,
                     "n_values": [1, 10, 200], "seeds": list(seeds)},
        "cells": [],
        "rows": rows,
    }


def _assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 300


@pytest.fixture
def drawn(monkeypatch):
    """What each saved figure shows: {file name: {panel title: {legend label: (xs, ys)}}}, plus
    the suptitle, the legend labels, each panel's x scale, x tick labels and y limits, the
    labels drawn with error bars, and the titles of panels left empty."""
    seen: dict[str, dict] = {}
    save = curves.save_figure

    def spy(fig, path):
        panels, ticks, bars = {}, {}, {}
        for ax in fig.axes:
            if ax.get_title() and ax.axison:
                lines = {line.get_label(): line for line in ax.get_lines()}
                # error bars: the label is the container's, its first line holds the data
                lines |= {box.get_label(): box[0] for box in ax.containers}
                panels[ax.get_title()] = {
                    label: (list(line.get_xdata()), list(line.get_ydata()))
                    for label, line in lines.items() if not label.startswith("_")
                }
                bars[ax.get_title()] = sorted(c.get_label() for c in ax.containers)
                ticks[ax.get_title()] = (ax.get_xscale(), [t.get_text() for t in
                                                           ax.get_xticklabels()],
                                         ax.get_ylim())
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        seen[path.name] = {
            "panels": panels, "ticks": ticks, "bars": bars, "title": fig.get_suptitle(),
            "legend": [t.get_text() for t in legends[0].get_texts()],
            "off": [ax.get_title() for ax in fig.axes if ax.get_title() and not ax.axison],
        }
        return save(fig, path)

    monkeypatch.setattr(curves, "save_figure", spy)
    return seen


def test_eval_results_give_one_figure_with_a_line_per_metric(tmp_path, drawn):
    paths = write_sequential_curves(_eval_results(), tmp_path)
    assert paths == [tmp_path / "sequential.png"]
    _assert_png(paths[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sequential.png"]  # no temp left
    figure = drawn["sequential.png"]
    assert figure["title"] == "ft-l: scores after N sequential edits"
    (title,) = figure["panels"]
    assert title == "tiny-llava · E-VQA eval"
    lines = figure["panels"][title]
    assert list(lines) == ["Rel", "T-Gen", "V-Gen", "T-Loc", "M-Loc", "Hard M-Loc"]
    assert figure["legend"] == list(lines)  # Avg and Gen-EM are not drawn
    assert lines["Rel"] == ([1, 10, 100], [0.0, 10.0, 20.0])
    assert lines["T-Loc"] == ([1, 10, 100], [3.0, 13.0, 23.0])
    assert lines["Hard M-Loc"] == ([1, 10, 100], [5.0, 15.0, 25.0])
    scale, labels, ylim = figure["ticks"][title]
    assert scale == "log" and labels == ["1", "10", "100"]
    assert ylim[0] <= 0 and ylim[1] >= 100


def test_single_protocol_results_write_nothing(tmp_path):
    assert write_sequential_curves(_eval_results("single", ns=(3,)), tmp_path) == []
    assert write_sequential_curves(_bench_results(protocol="single"), tmp_path) == []
    assert list(tmp_path.iterdir()) == []
    assert sequential_points(_eval_results("single", ns=(3,))) == []


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="neither a `dualedit eval` results.json"):
        sequential_points({"method": "ft-l"})


def test_bench_of_several_methods_gives_a_figure_per_metric(tmp_path, drawn):
    paths = write_sequential_curves(_bench_results(), tmp_path)
    names = ["rel", "t_gen", "v_gen", "t_loc", "m_loc", "m_loc_hard"]
    assert paths == [tmp_path / f"sequential_{name}.png" for name in names]
    for path in paths:
        _assert_png(path)
    rel = drawn["sequential_rel.png"]
    assert rel["title"] == "Rel after N sequential edits, per method"
    assert list(rel["panels"]) == ["llava · E-VQA", "blip2 · E-VQA", "llava · E-IC",
                                   "blip2 · E-IC"]
    assert rel["legend"] == ["none", "dualedit"]  # the skipped ke has no line
    assert rel["panels"]["blip2 · E-VQA"]["dualedit"] == ([1, 10, 200], [20.0, 21.0, 22.0])
    assert rel["panels"]["llava · E-IC"]["none"] == ([1, 48], [0.0, 1.0])
    assert rel["ticks"]["llava · E-IC"][1] == ["1", "48"]
    assert rel["ticks"]["llava · E-VQA"][1] == ["1", "10", "200"]
    assert rel["bars"]["llava · E-VQA"] == []  # one seed: no std


def test_a_cell_without_hard_m_loc_has_no_such_line(tmp_path, drawn):
    write_sequential_curves(_bench_results(), tmp_path)
    hard = drawn["sequential_m_loc_hard.png"]
    assert hard["panels"]["llava · E-VQA"]["none"] == ([1, 10, 200], [5.0, 6.0, 7.0])
    assert hard["panels"]["llava · E-IC"] == {}  # drawn empty, with a note
    # one method: the caption panels lack only the Hard M-Loc line
    one = _bench_results(methods=("dualedit",))
    out = tmp_path / "one"
    assert write_sequential_curves(one, out) == [out / "sequential.png"]
    _assert_png(out / "sequential.png")
    panels = drawn["sequential.png"]["panels"]
    assert "Hard M-Loc" in panels["blip2 · E-VQA"]
    assert list(panels["blip2 · E-IC"]) == ["Rel", "T-Gen", "V-Gen", "T-Loc", "M-Loc"]
    assert drawn["sequential.png"]["legend"][-1] == "Hard M-Loc"
    assert drawn["sequential.png"]["title"] == "dualedit: scores after N sequential edits"


def test_no_hard_m_loc_anywhere_writes_no_hard_figure(tmp_path):
    results = _bench_results()
    for row in results["rows"]:
        row["mean"].pop("m_loc_hard", None)
    paths = write_sequential_curves(results, tmp_path)
    assert [p.name for p in paths][-1] == "sequential_m_loc.png"
    assert not (tmp_path / "sequential_m_loc_hard.png").exists()


def test_several_seeds_draw_error_bars_and_say_so(tmp_path, drawn):
    write_sequential_curves(_bench_results(seeds=(0, 1, 2)), tmp_path)
    figure = drawn["sequential_v_gen.png"]
    assert figure["title"].endswith("(mean ± sample std over 3 seeds)")
    assert figure["panels"]["llava · E-VQA"]["dualedit"] == ([1, 10, 200], [22.0, 23.0, 24.0])
    assert figure["bars"]["llava · E-VQA"] == ["dualedit", "none"]


def test_a_cell_every_method_skipped_is_an_empty_panel(tmp_path, drawn):
    results = _bench_results()
    results["rows"] = [r for r in results["rows"]
                       if (r["backbone"], r["dataset"]) != ("blip2", "caption")]
    write_sequential_curves(results, tmp_path)
    assert drawn["sequential_rel.png"]["off"] == ["blip2 · E-IC"]
    assert len(drawn["sequential_rel.png"]["panels"]) == 3


def test_a_method_keeps_its_style_in_every_file(tmp_path, monkeypatch):
    styles: dict[str, set] = {}
    save = curves.save_figure

    def spy(fig, path):
        for ax in fig.axes:
            for line in ax.get_lines():
                if not line.get_label().startswith("_"):
                    styles.setdefault(line.get_label(), set()).add(
                        (line.get_color(), line.get_marker(), line.get_linestyle()))
        return save(fig, path)

    monkeypatch.setattr(curves, "save_figure", spy)
    methods = tuple(f"m{i}" for i in range(15))
    results = _bench_results(methods=methods)
    results["rows"] = [r for r in results["rows"] if r["dataset"] == "vqa"]  # 2 panels: faster
    write_sequential_curves(results, tmp_path)
    assert sorted(styles) == sorted(methods)
    assert all(len(found) == 1 for found in styles.values())
    assert len({next(iter(found)) for found in styles.values()}) == len(methods)


def test_from_a_written_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_eval_results()))
    assert write_sequential_curves_of(path) == [tmp_path / "sequential.png"]
    _assert_png(tmp_path / "sequential.png")


def test_eval_command_writes_sequential_png_beside_results(
    tiny_vlm, tiny_factory, tmp_path, caplog
):
    model, processor = tiny_factory(tiny_vlm.name)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data = tmp_path / "data"
    dataset = write_tiny_mmedit(data, n=3)
    (data / "vqa" / "vqa_eval.json").write_text(dataset.path.read_text())
    out = tmp_path / "eval"
    caplog.set_level("INFO", logger="dualedit.eval.sequential_curves")
    code = main([
        "-q", "eval", "--method", "none", "--model", str(model_dir), "--data", str(data),
        "--task", "vqa", "--protocol", "sequential", "--n", "1", "3", "--no-generation",
        "--out", str(out),
    ])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [run["n_edits"] for run in results["runs"]] == [1, 3]
    _assert_png(out / "sequential.png")
    assert str(out / "sequential.png") in caplog.text
    assert not list(out.glob("sequential_*.png"))
