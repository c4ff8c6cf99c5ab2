"""results.json fields, atomic writing, means and the markdown table's shape."""

import json

import pytest

from dualedit.eval.report import markdown_table, read_results, write_results
from dualedit.eval.results import Results, RunResult, mean_metrics


def make_results(method="ft-l", n_edits=None, hard=False, gen=False, scorer="paper"):
    records = [
        {"index": 0, "rel": 1.0, "t_gen": 0.5, "v_gen": 0.0, "t_loc": 1.0, "m_loc": 0.75},
        {"index": 1, "rel": 0.5, "t_gen": 0.5, "v_gen": 1.0, "t_loc": 0.5, "m_loc": 0.25},
    ]
    for record in records:
        if hard:
            record["m_loc_hard"] = 0.5
        if gen:
            record["gen_em"] = float(record["index"])
    run = RunResult(n_edits=n_edits, records=records, means=mean_metrics(records), wall_s=2.0,
                    records_per_s=1.0)
    return Results(
        method=method,
        editor_options={"steps": 3},
        backbone={"model_type": "llava", "name_or_path": "models/tiny-llava"},
        dataset={"path": "world/vqa/vqa_eval.json", "task": "vqa", "split": "eval", "n": 2},
        protocol="single" if n_edits is None else "sequential",
        scorer=scorer,
        prompt_protocol={"name": "mmedit-paper-code", "version": 1},
        settings={"batch_size": 4},
        versions={"dualedit": "0.1.0", "transformers": "5", "torch": "2"},
        time="2026-01-01T00:00:00+00:00",
        runs=[run],
        wall_s=2.0,
        records_per_s=1.0,
    )


def test_mean_metrics_and_avg():
    means = make_results().runs[0].means
    assert means == {
        "rel": 75.0, "t_gen": 50.0, "v_gen": 50.0, "t_loc": 75.0, "m_loc": 50.0, "avg": 60.0,
    }
    five = {"rel": 1.0, "t_gen": 1.0, "v_gen": 1.0, "t_loc": 1.0, "m_loc": 1.0}
    with pytest.raises(ValueError, match="'m_loc' is missing for records \\[1\\]"):
        four = {k: v for k, v in five.items() if k != "m_loc"}
        mean_metrics([{"index": 0, **five}, {"index": 1, **four}])
    # optional metrics average over the records that have them.
    mixed = mean_metrics([{"index": 0, **five, "m_loc_hard": 0.5}, {"index": 1, **five}])
    assert mixed["m_loc_hard"] == 50.0 and mixed["avg"] == 100.0
    with pytest.raises(ValueError):
        mean_metrics([])


def test_write_results_fields_and_round_trip(tmp_path):
    results = make_results(hard=True, gen=True)
    path = write_results(results, tmp_path / "out" / "results.json")
    data = json.loads(path.read_text())
    for key in ("method", "backbone", "dataset", "protocol", "scorer", "prompt_protocol",
                "versions", "time", "runs", "wall_s", "records_per_s", "units"):
        assert key in data, key
    assert data["backbone"]["model_type"] == "llava"
    assert data["dataset"]["n"] == 2
    assert data["runs"][0]["records"][1]["gen_em"] == 1.0
    assert data["runs"][0]["means"]["m_loc_hard"] == 50.0
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temp file left behind
    assert read_results(path) == results


def test_write_results_refuses_nan_and_keeps_old_file(tmp_path):
    path = write_results(make_results(), tmp_path / "results.json")
    before = path.read_text()
    bad = make_results()
    bad.runs[0].means["rel"] = float("nan")
    with pytest.raises(ValueError):
        write_results(bad, path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_read_results_rejects_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"method": "none"}')
    with pytest.raises(ValueError, match="not a results file"):
        read_results(path)


def test_markdown_table_shape():
    assert markdown_table(make_results()) == markdown_table([make_results()])
    table = markdown_table([make_results(method="none"), make_results(n_edits=10)])
    lines = table.strip().split("\n")
    assert lines[0] == (
        "| method | backbone | dataset | Rel | T-Gen | V-Gen | T-Loc | M-Loc | Avg |"
    )
    assert len(lines) == 4
    assert lines[2] == (
        "| none | tiny-llava | E-VQA eval | 75.00 | 50.00 | 50.00 | 75.00 | 50.00 | 60.00 |"
    )
    assert lines[3].startswith("| ft-l (seq N=10) | tiny-llava | E-VQA eval | 75.00 |")
    assert all(line.count("|") == 10 for line in lines)


def test_markdown_table_optional_columns():
    table = markdown_table([make_results(hard=True, gen=True, scorer="easyedit"), make_results()])
    lines = table.strip().split("\n")
    assert lines[0].endswith("| Avg | Hard M-Loc | Gen-EM |")
    assert lines[2].startswith("| ft-l [easyedit] |")
    assert lines[2].endswith("| 60.00 | 50.00 | 50.00 |")
    assert lines[3].endswith("| 60.00 | - | - |")
