"""The demo end to end at a tiny scale: world -> tiny pretraining -> none, ft-l and DualEdit (a
few adapter training steps) -> table."""

from __future__ import annotations

import json

import pytest
import torch

from dualedit.demo import cached_world, run_demo
from dualedit.small_vlm.pretrain import TrainSettings
from dualedit.train import TrainSettings as AdapterSettings
from dualedit.world import FORMAT_VERSION, WORLD_FILE

WORLD = dict(
    n_train_vqa=4, n_eval_vqa=3, n_train_caption=2, n_eval_caption=2,
    renderings_per_entity=1, heldout_per_entity=1,
)
ADAPTERS = AdapterSettings(batch_size=1, max_steps=2, eval_every=2, val_edits=1, log_every=1)
PRETRAIN = dict(
    size="tiny",
    settings=TrainSettings(steps=2, vision_steps=2, batch_size=8, text_batch_size=4,
                           vision_batch_size=8, eval_batch_size=32, num_threads=1),
)


def test_demo_table_has_both_methods_backbones_and_datasets(tmp_path):
    kwargs = dict(cache_dir=tmp_path / "cache", progress=False, world_options=WORLD,
                  pretrain_options=PRETRAIN, train_settings=ADAPTERS)
    table = run_demo(tmp_path / "out", **kwargs)
    rows = [line.split("|")[1:4] for line in table.splitlines()[2:]]
    labels = [tuple(cell.strip() for cell in row) for row in rows]
    assert sorted(labels) == sorted(
        (method, f"{arch}-seed0", dataset)
        for method in ("none", "ft-l", "dualedit")
        for arch in ("llava", "blip2")
        for dataset in ("E-VQA eval", "E-IC eval")
    ), table
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(summary["runs"]) == 12
    assert set(summary["pretraining"]) == {"llava", "blip2"}
    # The DualEdit rows used editors trained for the given budget, one run per (arch, dataset),
    # each ending with the tau chosen on its validation edits.
    trained = summary["trained"]
    assert set(trained) == {
        f"dualedit {a}-{t}" for a in ("llava", "blip2") for t in ("vqa", "caption")
    }
    assert all(a["steps"] == 2 and a["best_step"] == 2 for a in trained.values())
    assert all(-1 <= a["finish"]["tau"] <= 1 for a in trained.values())
    for key in trained:
        run = key.split()[1]
        assert (tmp_path / "cache" / "trained" / "dualedit" / f"{run}-seed0" / "best").is_dir()
    dualedit_runs = [run for run in summary["runs"] if run["method"] == "dualedit"]
    assert all(run["editor_options"]["pretrained"].endswith("best") for run in dualedit_runs)
    for run in summary["runs"]:
        if run["method"] == "none":
            means = run["runs"][0]["means"]
            assert means["t_loc"] == 100.0 and means["m_loc"] == 100.0
    assert (tmp_path / "out" / "table.md").read_text().strip() == table.strip()
    # A second run reuses the cached world and models (another thread count changes nothing that
    # is learned): the pretraining metrics are the same, and torch's thread count is restored.
    threads = torch.get_num_threads()
    run_demo(tmp_path / "out2", threads=threads + 1, methods=["none"], **kwargs)
    assert torch.get_num_threads() == threads
    again = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert again["pretraining"] == summary["pretraining"]


def test_cached_world_is_reused_and_drawn_again_when_its_format_is_stale(tmp_path):
    world_dir = cached_world(tmp_path, 0, progress=False, world_options=WORLD)
    meta_path = world_dir / WORLD_FILE
    first = meta_path.stat().st_mtime_ns
    assert cached_world(tmp_path, 0, progress=False, world_options=WORLD) == world_dir
    assert meta_path.stat().st_mtime_ns == first
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = FORMAT_VERSION - 1
    meta_path.write_text(json.dumps(meta))
    cached_world(tmp_path, 0, progress=False, world_options=WORLD)
    assert json.loads(meta_path.read_text())["format_version"] == FORMAT_VERSION


def test_demo_adapters_of_another_recipe_are_trained_again(tmp_path, tiny_factory):
    import dualedit.demo as demo
    from test_train_data import write_tiny_mmedit

    from dualedit.editors import get_method

    write_tiny_mmedit(tmp_path / "world", n=6)  # vqa/vqa_train.json and images/
    world = tmp_path / "world"
    model_and_processor = tiny_factory("llava")
    settings = AdapterSettings(batch_size=2, max_steps=2, eval_every=2, val_edits=2, log_every=1)
    spec = get_method("dualedit")
    args = (tmp_path / "cache", spec, "llava", "vqa", 0, world, model_and_processor, False,
            settings)
    recipe = {"text_layer": 1, "visual_layer": 2}
    first = demo.cached_training(*args, options=recipe)
    assert first.resumed_from is None and first.steps == 2
    again = demo.cached_training(*args, options=recipe)  # the same recipe: the run is reused
    assert again.resumed_from == 2
    other = demo.cached_training(*args, options={**recipe, "use_visual": False})
    assert other.resumed_from is None and other.steps == 2  # a stale entry is replaced
    saved = json.loads((other.best_dir / "adapter_config.json").read_text())
    assert saved["config"]["use_visual"] is False and saved["method"] == "dualedit"
    # The same recipe over other base weights (the cached model was pretrained again): the run
    # trained on the old model is replaced, not resumed.
    retrained = (*args[:6], tiny_factory("llava", seed=1), *args[7:])
    fresh = demo.cached_training(*retrained, options={**recipe, "use_visual": False})
    assert fresh.resumed_from is None and fresh.steps == 2
    with pytest.raises(ValueError, match="'ft-l' has no training recipe"):
        demo.cached_training(tmp_path / "cache", get_method("ft-l"), *args[2:])
