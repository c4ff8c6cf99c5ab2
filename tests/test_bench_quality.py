"""`dualedit bench quality` at a tiny scale: the demo's tiny world and 2-step pretraining, one
backbone and dataset, a few records. What is asserted would differ if the bench measured the
wrong thing: the bytes an edit adds (none: only its description; ft-l: that plus the tuned MLP),
reuse of finished cells, redoing of cells made with other settings, mean and std over seeds."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from test_demo import ADAPTERS, PRETRAIN, WORLD

import dualedit.bench.cells as cells_module
from dualedit.backbones import get_backbone
from dualedit.bench.quality import run_quality_bench
from dualedit.cli import main
from dualedit.data.mmedit import load_split
from dualedit.data.requests import edit_requests
from dualedit.demo import DEFAULT_METHODS, method_names, run_demo
from dualedit.editors.registry import METHODS
from dualedit.evaluate import load_vlm

#: The bench's own run_eval, which the spies below wrap (never a spy of an earlier call).
RUN_EVAL = cells_module.run_eval
HEADER = ["method", "backbone", "dataset", "Rel", "T-Gen", "V-Gen", "T-Loc", "M-Loc", "Avg",
          "Hard M-Loc", "Gen-EM", "train s", "apply ms", "bytes/edit"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: the tiny world and models are drawn and pretrained once."""
    return tmp_path_factory.mktemp("bench-cache")


def _tiny(cache, **overrides):
    """The keyword arguments of a tiny bench: llava on E-VQA, 2 records, 2 timed edits."""
    return {
        "cache_dir": cache, "progress": False, "world_options": WORLD,
        "pretrain_options": PRETRAIN, "backbones": ["llava"], "datasets": ["vqa"], "limit": 2,
        "apply_samples": 2, **overrides,
    }


def _table_rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def _cell_file(out, method, seed=0, protocol="single"):
    return out / "cells" / f"seed{seed}" / f"{method}-llava-vqa-{protocol}.json"


def _spy_run_eval(monkeypatch, fail_on=()):
    """Record the methods `run_eval` runs for; raise KeyboardInterrupt (a kill) for `fail_on`."""
    calls = []

    def spy(**kwargs):
        calls.append(kwargs["method"])
        if kwargs["method"] in fail_on:
            raise KeyboardInterrupt
        return RUN_EVAL(**kwargs)

    monkeypatch.setattr(cells_module, "run_eval", spy)
    return calls


def test_bench_writes_results_and_table_and_measures_each_edit(tmp_path, cache):
    out = tmp_path / "out"
    table = run_quality_bench(out, methods=["none", "ft-l"], **_tiny(cache))
    rows = _table_rows(table)
    assert rows[0] == HEADER
    assert [row[:3] for row in rows[2:]] == [["none", "llava", "E-VQA"], ["ft-l", "llava", "E-VQA"]]
    assert table.splitlines()[0] == "Quality bench, single-edit protocol, 1 seed (0)."
    assert "±" not in table
    assert (out / "table.md").read_text() == table
    summary = json.loads((out / "results.json").read_text())
    assert summary["settings"]["methods"] == ["none", "ft-l"]
    assert summary["settings"]["source"]["kind"] == "world"
    none, ftl = summary["cells"]
    assert (none["method"], ftl["method"]) == ("none", "ft-l")
    for cell in (none, ftl):
        assert cell["status"] == "done" and cell["train_s"] is None and cell["trained"] is None
        assert cell["apply_samples"] == 2 and cell["apply_s_median"] > 0
        assert cell["results"]["dataset"]["n"] == 2  # the limit reached run_eval
        assert _cell_file(out, cell["method"]).is_file()
    assert none["results"]["runs"][0]["means"]["t_loc"] == 100.0
    # What a saved folder grows by with one edit: none keeps only the edit's description (its
    # prompt and target among it); ft-l keeps that plus the whole tuned MLP of the last layer (in
    # a tensor file with a small header).
    (first,) = edit_requests(load_split(cache / "world-seed0", "vqa", "eval")[:1], "vqa")
    assert len(first.prompt) + len(first.target) < none["bytes_per_edit"] < 1000
    model, _ = load_vlm(cache / "models" / "llava-seed0")
    backbone = get_backbone(model)
    mlp = backbone.mlp(model, backbone.depth(model) - 1)
    mlp_bytes = sum(p.numel() * p.element_size() for p in mlp.parameters())
    assert mlp_bytes < ftl["bytes_per_edit"] - none["bytes_per_edit"] < mlp_bytes + 2048
    # The table shows the cells' own numbers.
    means = ftl["results"]["runs"][0]["means"]
    ftl_row = dict(zip(HEADER, rows[3]))
    assert ftl_row["Rel"] == f"{means['rel']:.2f}" and ftl_row["Avg"] == f"{means['avg']:.2f}"
    assert ftl_row["train s"] == "-" and ftl_row["bytes/edit"] == str(ftl["bytes_per_edit"])
    assert ftl_row["apply ms"] == f"{1000 * ftl['apply_s_median']:.3f}"
    assert summary["rows"][1]["per_seed"]["0"]["rel"] == means["rel"]


def test_a_killed_bench_resumes_and_changed_settings_redo_a_cell(tmp_path, cache, monkeypatch):
    out = tmp_path / "out"
    kwargs = _tiny(cache, apply_samples=1)
    calls = _spy_run_eval(monkeypatch, fail_on=("ft-l",))
    with pytest.raises(KeyboardInterrupt):
        run_quality_bench(out, methods=["none", "ft-l"], **kwargs)
    assert calls == ["none", "ft-l"]
    assert _cell_file(out, "none").is_file() and not _cell_file(out, "ft-l").exists()
    # The rerun does only the cell the kill left unfinished.
    calls = _spy_run_eval(monkeypatch)
    first = run_quality_bench(out, methods=["none", "ft-l"], **kwargs)
    assert calls == ["ft-l"]
    stats = {m: _cell_file(out, m).stat() for m in ("none", "ft-l")}
    # A finished bench run again evaluates nothing and rewrites no cell file.
    calls = _spy_run_eval(monkeypatch, fail_on=("none", "ft-l"))
    assert run_quality_bench(out, methods=["none", "ft-l"], **kwargs) == first
    assert calls == []
    for method, stat in stats.items():
        now = _cell_file(out, method).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    # --retime: no evaluation, the scores kept, apply timed again in this run.
    before = json.loads(_cell_file(out, "ft-l").read_text())
    calls = _spy_run_eval(monkeypatch, fail_on=("none", "ft-l"))
    run_quality_bench(out, methods=["none", "ft-l"], retime=True, **kwargs)
    after = json.loads(_cell_file(out, "ft-l").read_text())
    assert calls == [] and after["results"] == before["results"]
    assert after["apply_s_median"] != before["apply_s_median"] and after["apply_samples"] == 1
    # Another limit is another cell: redone, and its file says so.
    calls = _spy_run_eval(monkeypatch)
    run_quality_bench(out, methods=["none"], **{**kwargs, "limit": 1})
    assert calls == ["none"]
    cell = json.loads(_cell_file(out, "none").read_text())
    assert cell["settings"]["limit"] == 1 and cell["results"]["dataset"]["n"] == 1
    # So is a cell file that records other method options than the method's now.
    cell["settings"]["options"] = {"steps": 1}
    _cell_file(out, "none").write_text(json.dumps(cell))
    run_quality_bench(out, methods=["none"], **{**kwargs, "limit": 1})
    assert calls == ["none", "none"]


def test_several_seeds_give_mean_and_std_per_cell(tmp_path, cache):
    out = tmp_path / "out"
    table = run_quality_bench(out, methods=["none"], seeds=[0, 1], **_tiny(cache, apply_samples=1))
    assert "2 seeds (0, 1): mean ± sample std" in table.splitlines()[0]
    (row,) = _table_rows(table)[2:]
    assert all("±" in cell for cell in row[3:9])  # every paper metric
    summary = json.loads((out / "results.json").read_text())
    assert [c["seed"] for c in summary["cells"]] == [0, 1]
    # Each seed has its own world and model.
    paths = {c["results"]["backbone"]["name_or_path"] for c in summary["cells"]}
    assert len(paths) == 2 and (cache / "world-seed1").is_dir()
    (agg,) = summary["rows"]
    assert sorted(agg["per_seed"]) == ["0", "1"]
    for key in ("rel", "avg", "t_loc"):
        values = [agg["per_seed"][s][key] for s in ("0", "1")]
        assert math.isclose(agg["mean"][key], sum(values) / 2)
        assert math.isclose(agg["std"][key], statistics.stdev(values), abs_tol=1e-12)
    assert row[3] == f"{agg['mean']['rel']:.2f} ± {agg['std']['rel']:.2f}"


def test_sequential_protocol_rows_per_n_and_unsupported_methods_are_skipped(
    tmp_path, cache, monkeypatch
):
    out = tmp_path / "seq"
    table = run_quality_bench(out, methods=["none", "ft-l"], protocol="sequential",
                              n_values=[1, 2], **_tiny(cache, apply_samples=1))
    rows = _table_rows(table)
    assert rows[0][:4] == ["method", "backbone", "dataset", "N"]
    assert [(r[0], r[3]) for r in rows[2:]] == [("none", "1"), ("none", "2"), ("ft-l", "1"),
                                               ("ft-l", "2")]
    assert _cell_file(out, "ft-l", protocol="sequential").is_file()
    # the metrics against N beside results.json: a figure per metric, one line per method
    for metric in ("rel", "t_gen", "v_gen", "t_loc", "m_loc", "m_loc_hard"):
        assert (out / f"sequential_{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def refuse_ftl(**kwargs):
        if kwargs["method"] in ("ft-l",):
            raise NotImplementedError("cannot hold many edits")
        return RUN_EVAL(**kwargs)

    monkeypatch.setattr(cells_module, "run_eval", refuse_ftl)
    out = tmp_path / "skipped"
    table = run_quality_bench(out, methods=["none", "ft-l"], protocol="sequential",
                              n_values=[1], **_tiny(cache, apply_samples=0))
    rows = _table_rows(table)
    assert rows[-1][0] == "ft-l (skipped)" and set(rows[-1][4:]) == {"-"}
    cell = json.loads(_cell_file(out, "ft-l", protocol="sequential").read_text())
    assert cell["status"] == "skipped" and "many edits" in cell["reason"]
    # only `none` has scores: one figure, a line per metric
    assert (out / "sequential.png").is_file() and not list(out.glob("sequential_*.png"))


def test_dualedit_trains_and_is_the_apply_reference(tmp_path, cache):
    out = tmp_path / "out"
    table = run_quality_bench(out, methods=["none", "dualedit"], train_settings=ADAPTERS,
                              **_tiny(cache, apply_samples=1))
    rows = _table_rows(table)
    header = rows[0]
    assert header[-3:] == ["apply ms", "apply × DualEdit", "bytes/edit"]
    summary = json.loads((out / "results.json").read_text())
    none, dual = summary["cells"]
    assert dual["trained"]["steps"] == 2 and dual["train_s"] > 0
    assert dual["settings"]["train_settings"]["max_steps"] == 2
    assert (cache / "trained" / "dualedit" / "llava-vqa-seed0" / "best").is_dir()
    # DualEdit's edits live in its memory files, not in the adapter tensors: they are counted.
    model, _ = load_vlm(cache / "models" / "llava-seed0")
    key_bytes = 4 * get_backbone(model).hidden_size(model)  # one float32 key of the text layer
    assert dual["bytes_per_edit"] > none["bytes_per_edit"] + key_bytes
    by_method = {row[0]: dict(zip(header, row)) for row in rows[2:]}
    assert by_method["dualedit"]["apply × DualEdit"] == "1.00"
    ratio = none["apply_s_median"] / dual["apply_s_median"]
    assert by_method["none"]["apply × DualEdit"] == f"{ratio:.2f}"
    assert float(by_method["dualedit"]["train s"]) == pytest.approx(dual["train_s"], abs=0.06)


def test_bad_requests_are_refused_before_any_work(tmp_path, cache, monkeypatch):
    from dualedit.bench import quality

    def no_work(*args, **kwargs):
        raise AssertionError("the bench started working")

    monkeypatch.setattr(quality, "cached_world", no_work)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"unknown method 'nope'; available: none, ft-l"):
        run_quality_bench(out, methods=["none", "nope"], **_tiny(cache))
    bad = [({"backbones": ["qwen"]}, "unknown backbone 'qwen'"),
           ({"datasets": ["coco"]}, "unknown dataset 'coco'"),
           ({"protocol": "batch"}, "unknown protocol 'batch'"),
           ({"seeds": [0, 0]}, "seeds"),
           ({"apply_samples": -1}, "apply_samples"),
           ({"model": tmp_path}, "give both a model folder and an MMEdit data folder")]
    for override, message in bad:
        with pytest.raises(ValueError, match=message):
            run_quality_bench(out, methods=["none"], **_tiny(cache, **override))
    assert not out.exists()


def test_model_and_data_folders_and_the_cli(tmp_path, cache, capsys):
    run_quality_bench(tmp_path / "warm", methods=["none"], **_tiny(cache, apply_samples=0))
    model_dir, world = cache / "models" / "llava-seed0", cache / "world-seed0"
    args = ["-q", "bench", "quality", "--out", str(tmp_path / "out"), "--model", str(model_dir),
            "--data", str(world), "--methods", "none", "--datasets", "vqa", "--limit", "1",
            "--apply-samples", "1", "--cache-dir", str(tmp_path / "cache2")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| none | llava-seed0 | E-VQA |" in out
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["settings"]["source"] == {"kind": "folders", "model": str(model_dir.resolve()),
                                             "data": str(world.resolve())}
    assert (tmp_path / "out" / "cells" / "seed0" / "none-llava-seed0-vqa-single.json").is_file()
    # A trained method needs the data's train split, checked before any work (one-line error).
    data = tmp_path / "eval-only"
    (data / "vqa").mkdir(parents=True)
    (data / "vqa" / "vqa_eval.json").write_text((world / "vqa" / "vqa_eval.json").read_text())
    bad = args[:8] + [str(data), "--methods", "none", "dualedit", "--datasets", "vqa"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "vqa_train.json not found (training dualedit on vqa needs it)" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["-q", "bench", "quality", "--out", str(tmp_path / "x"), "--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_cli_bench_quality_passes_its_options(monkeypatch, tmp_path, capsys):
    from dualedit.bench import quality

    calls = []
    monkeypatch.setattr(quality, "run_quality_bench", lambda out, **kw: calls.append((out, kw))
                        or "table")
    args = ["-q", "bench", "quality", "--out", str(tmp_path), "--methods", "all", "--seeds", "0",
            "1", "--protocol", "sequential", "--n", "1", "10", "--backbones", "blip2",
            "--train-steps", "5", "--threads", "1", "--cache", str(tmp_path / "c")]
    assert main(args) == 0
    out, kw = calls[-1]
    assert out == tmp_path and kw["methods"] == ["all"] and kw["seeds"] == (0, 1)
    assert kw["protocol"] == "sequential" and kw["n_values"] == (1, 10)
    assert kw["backbones"] == ["blip2"] and kw["datasets"] == ["vqa", "caption"]
    assert (kw["train_steps"], kw["threads"], kw["progress"]) == (5, 1, False)
    assert kw["cache_dir"] == tmp_path / "c" and kw["apply_samples"] == 10
    assert kw["model"] is None and kw["data"] is None and kw["limit"] is None
    assert kw["retime"] is False
    assert "table" in capsys.readouterr().out


def test_demo_methods_all_expands_to_every_registered_method(monkeypatch, tmp_path):
    assert method_names(None) == list(DEFAULT_METHODS)
    assert method_names(["all"]) == list(METHODS)
    assert method_names(["ft-l", "all", "none"]) == ["ft-l"] + [m for m in METHODS if m != "ft-l"]
    with pytest.raises(ValueError, match="unknown method 'nope'; available: none, ft-l"):
        run_demo(tmp_path, methods=["all", "nope"], cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before the world is drawn
    import dualedit.demo

    calls = []
    monkeypatch.setattr(dualedit.demo, "run_demo", lambda **kw: calls.append(kw) or "table")
    assert main(["-q", "demo", "--out", str(tmp_path), "--methods", "all"]) == 0
    assert calls[-1]["methods"] == ["all"]
