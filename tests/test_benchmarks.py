"""Smoke tests of the benchmarks under benchmarks/: each runs at a tiny size (--quick) and writes
JSON with the documented fields. Timings are never asserted on; what is asserted is what would be
wrong if a benchmark measured the wrong thing (the gate opens on the stored edit's own sample, the
naive training step computes the efficient step's loss and gradients)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """A benchmark script as a module (its folder on sys.path, as when run as a script)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _check_common(data: dict, benchmark: str) -> None:
    assert data["benchmark"] == benchmark
    machine = data["machine"]
    for key in ("torch", "transformers", "cpu_count", "torch_threads", "device", "dtype",
                "load_average_start", "load_average_end"):
        assert key in machine, key
    assert machine["device"] == "cpu" and machine["dtype"] == "float32"
    assert machine["torch_threads"] == 1
    assert data["settings"]["quick"] is True and data["settings"]["interleaved"] is True
    assert data["settings"]["repeats"] == 3


def _check_times(times: dict, names: list[str], runs: int = 3) -> None:
    assert sorted(times) == sorted(names)
    for entry in times.values():
        assert entry["runs"] == runs
        assert 0 < entry["min_ms"] <= entry["p25_ms"] <= entry["median_ms"] <= entry["p75_ms"]
        assert entry["p75_ms"] <= entry["max_ms"]


def _check_ratio(entry: dict) -> None:
    assert entry["ratio"] > 0
    assert entry["paired_p25"] <= entry["paired_median"] <= entry["paired_p75"]


# -- common.py --------------------------------------------------------------------------------


def test_interleaved_timing_rotates_and_runs_hooks_untimed():
    common = _load("common")
    calls = []
    variants = [
        common.Variant(n, lambda n=n: calls.append(n), before=lambda: calls.append("<"),
                       after=lambda: calls.append(">"))
        for n in "abc"
    ]
    cpu = common.torch.device("cpu")
    times = common.time_interleaved(variants, repeats=3, warmup=1, device=cpu)
    runs = [c for c in calls if c not in "<>"]
    assert runs == list("abc") + list("abc") + list("bca") + list("cab")  # warm-up, 3 rounds
    assert calls.count("<") == calls.count(">") == 12
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_summary_and_ratio_values():
    common = _load("common")
    s = common.summary([0.001, 0.003, 0.002, 0.004])
    assert s["median_ms"] == pytest.approx(2.5) and s["runs"] == 4
    assert s["p25_ms"] == pytest.approx(1.75) and s["p75_ms"] == pytest.approx(3.25)
    times = {"slow": [2.0, 4.0, 6.0], "fast": [1.0, 1.0, 3.0]}
    r = common.ratio(times, "slow", "fast")
    assert r["ratio"] == pytest.approx(4.0)  # median 4 / median 1
    assert r["paired_median"] == pytest.approx(2.0)  # per round: 2, 4, 2
    assert (r["paired_p25"], r["paired_p75"]) == (pytest.approx(2.0), pytest.approx(3.0))
    text = common.table([{"a": 1.23456, "b": None}], ["a", "b"])
    assert text.splitlines()[-1].split() == ["1.235", "-"]


# -- the three benchmarks ---------------------------------------------------------------------


def test_apply_edit_quick(tmp_path):
    out = tmp_path / "apply_edit.json"
    _load("apply_edit").main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    _check_common(data, "apply_edit")
    assert sorted(data["results"]) == ["blip2", "llava"]
    for result in data["results"].values():
        assert result["source"]["kind"] == "fresh" and result["source"]["size"] == "tiny"
        layers = result["layers"]
        assert layers["stops_after"] == max(layers["text"], layers["visual"]) < layers["depth"]
        _check_times(result["single"]["times"],
                     ["edit", "full_forward", "encode_full_forward", "capture_forward"])
        assert sorted(result["single"]["ratios"]) == [
            "capture_vs_full_forward", "edit_vs_encode_full_forward", "edit_vs_full_forward"]
        for entry in result["single"]["ratios"].values():
            _check_ratio(entry)
        [batched] = result["batched"]
        assert batched["batch_size"] == 2
        _check_times(batched["times"],
                     ["edit_many[2]", "full_forward[2]", "encode_full_forward[2]"])
        target = result["target"]
        assert target["max"] == 0.8 and isinstance(target["met"], bool)
        assert target["value"] == result["single"]["ratios"]["edit_vs_full_forward"]["ratio"]


def test_inference_quick(tmp_path):
    out = tmp_path / "inference.json"
    _load("inference").main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    _check_common(data, "inference")
    for result in data["results"].values():
        assert result["edit_counts"] == [1, 10]
        assert sorted(result["groups"]) == [
            "forward/related", "forward/unrelated", "generate/related", "generate/unrelated"]
        for group, entry in result["groups"].items():
            _check_times(entry["times"], ["bare", "edits=1", "edits=10"])
            assert sorted(entry["ratios"]) == ["edits=1", "edits=10"]
            for ratio in entry["ratios"].values():
                _check_ratio(ratio)
                assert ratio["denominator"] == "bare"
            opened = entry["gate_open_fraction"]
            assert sorted(opened) == ["edits=1", "edits=10"]
            if group.endswith("/related"):
                # The stored edit's own sample: similarity 1, so the gate must open.
                assert opened == {"edits=1": 1.0, "edits=10": 1.0}
        assert result["groups"]["generate/related"]["new_tokens"] == 2
        assert result["bytes_per_edit"] > 0
        assert set(result["target"]["groups"]) == set(result["groups"])


def test_memory_load_quick(tmp_path):
    out = tmp_path / "memory_load.json"
    _load("memory_load").main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    _check_common(data, "memory_load")
    for arch, results in data["results"].items():
        assert [r["edits"] for r in results] == [10, 100]
        for result in results:
            _check_times(result["times"], ["load_whole", "load_mapped", "first_states_whole",
                                           "first_states_mapped"])
            for entry in result["ratios"].values():
                _check_ratio(entry)
            assert result["same_states"] is True and result["file_mb"] > 0
        assert results[1]["file_mb"] > results[0]["file_mb"] * 5  # distinct states per edit
    assert data["target"]["edits"] == 100 and isinstance(data["target"]["met"], bool)


def test_train_step_quick_without_memory(tmp_path):
    out = tmp_path / "train_step.json"
    _load("train_step").main(["--quick", "--no-memory", "--out", str(out)])
    data = json.loads(out.read_text())
    _check_common(data, "train_step")
    for result in data["results"].values():
        _check_times(result["times"], ["efficient", "naive", "naive_pruned"])
        assert sorted(result["speedup"]) == ["naive", "naive_pruned"]
        assert result["target"]["value"] == result["speedup"]["naive"]["ratio"]
        assert result["rows"] == {"image": 8, "image_seq": result["rows"]["image_seq"], "text": 2}
        agreement = result["agreement"]
        losses = agreement["loss"]
        assert losses["naive"] == pytest.approx(losses["efficient"], rel=1e-5)
        assert losses["naive_pruned"] == pytest.approx(losses["efficient"], rel=1e-5)
        # Every adapter parameter has a gradient (seeded output projection), and they agree.
        assert agreement["naive_grad_rel_diff"] < 1e-4
        assert agreement["naive_pruned_grad_rel_diff"] < 1e-4
        assert "memory" not in result


def test_train_step_memory_child_reports_a_peak():
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "train_step.py"), "--quick", "--arch", "llava",
         "--child-memory", "naive"],
        capture_output=True, text=True, check=True, timeout=120,
    )
    entry = json.loads(done.stdout.strip().splitlines()[-1])["llava"]
    assert entry["peak_bytes"] > 0
    assert entry["method"]


@pytest.mark.slow
def test_train_step_quick_with_memory(tmp_path):
    # Slow (about 30 s on two shared cores): one subprocess per variant, each importing torch.
    out = tmp_path / "train_step.json"
    _load("train_step").main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    for result in data["results"].values():
        assert sorted(result["memory"]) == ["efficient", "naive", "naive_pruned"]
        assert all(e["peak_bytes"] > 0 for e in result["memory"].values())
        assert result["memory_ratio"]["efficient"] == 1.0
