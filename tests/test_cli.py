"""The command line as a user runs it: world, data stats, error exit codes."""

from __future__ import annotations

import json

import pytest

from dualedit.cli import build_parser, main
from dualedit.options import parse_option_pairs

TINY_WORLD = [
    "--train-vqa", "6", "--eval-vqa", "4", "--train-caption", "4", "--eval-caption", "2",
    "--renderings", "2",
]


def test_world_then_data_stats(tmp_path, capsys):
    out = tmp_path / "world"
    assert main(["-q", "world", "--out", str(out), "--seed", "3", *TINY_WORLD]) == 0
    assert len(json.loads((out / "vqa" / "vqa_eval.json").read_text())) == 4
    capsys.readouterr()
    assert main(["data", "stats", str(out), "--require-images"]) == 0
    table = capsys.readouterr().out
    counts = {line.split()[0]: int(line.split()[3]) for line in table.splitlines()[2:]}
    assert counts == {
        "vqa/vqa_train.json": 6,
        "vqa/vqa_eval.json": 4,
        "caption/caption_train_edit.json": 4,
        "caption/caption_eval_edit.json": 2,
    }


def test_data_stats_on_the_real_files(mmedit_root, capsys):
    assert main(["data", "stats", str(mmedit_root)]) == 0
    table = capsys.readouterr().out
    assert [int(line.split()[3]) for line in table.splitlines()[2:]] == [6345, 2093, 2849, 1000]


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_eval_arguments_parse():
    args = build_parser().parse_args(
        ["eval", "--method", "ft-l", "--model", "m", "--data", "d", "--protocol", "sequential",
         "--n", "1", "10"]
    )
    assert (args.method, args.protocol, args.n, args.scorer, args.split) == (
        "ft-l", "sequential", [1, 10], "paper", "eval"
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--method", "none", "--model", "m", "--data", "d",
                                   "--scorer", "nope"])


def test_editor_options_parse_as_json_or_text():
    args = build_parser().parse_args(
        ["eval", "--method", "dualedit", "--model", "m", "--data", "d",
         "--editor-option", "tau=0.7", "--editor-option", "gate_key=last_position",
         "--editor-option", "gate=false"]
    )
    assert parse_option_pairs(args.option) == {
        "tau": 0.7, "gate_key": "last_position", "gate": False
    }
    with pytest.raises(ValueError, match="'tau': expected KEY=VALUE"):
        parse_option_pairs(["tau"])
    same = build_parser().parse_args(
        ["eval", "--method", "dualedit", "--model", "m", "--data", "d", "--option", "tau=0.7"]
    )
    assert same.option == ["tau=0.7"]


def test_methods_lists_every_registered_method(capsys):
    from dualedit.editors import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if not line.startswith(" ")]
    assert {line[0]: line[1] for line in lines} == {
        name: "trained" if spec.trainable else "untrained" for name, spec in METHODS.items()
    }
    assert "steps=None" in out and "vision_blocks=0" in out and "text_layer=None" in out


def test_a_trained_method_without_its_weights_is_refused(tmp_path, capsys):
    args = ["-q", "eval", "--method", "dualedit", "--model", str(tmp_path / "m"),
            "--data", str(tmp_path)]
    assert main(args) == 2
    assert "--editor DIR" in capsys.readouterr().err


def test_train_refuses_untrained_methods_and_unknown_options_before_loading(tmp_path, capsys):
    base = ["-q", "train", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path),
            "--out", str(tmp_path / "run")]
    assert main([*base, "--method", "ft-l"]) == 2
    assert "'ft-l' is not trained" in capsys.readouterr().err
    assert main([*base, "--method", "dualedit", "--option", "text_layr=0"]) == 2
    assert "['text_layr']" in capsys.readouterr().err
    config = tmp_path / "config.json"
    config.write_text('{"text_layer": 0, "widht": 64}')
    assert main([*base, "--method", "dualedit", "--config", str(config)]) == 2
    assert "['widht']" in capsys.readouterr().err
    config.write_text("[1, 2]")
    assert main([*base, "--method", "dualedit", "--config", str(config)]) == 2
    assert "config.json: expected a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_world_entities_option_and_too_many_eval_edits(tmp_path, capsys):
    out = tmp_path / "world"
    assert main(["-q", "world", "--out", str(out), "--entities", "150", *TINY_WORLD]) == 0
    world = json.loads((out / "world.json").read_text())
    assert len(world["entities"]) == 150 and "heart" in world["attributes"]["shape"]
    assert world["counts"]["renderings_per_entity"] == 2
    capsys.readouterr()
    # 8 entities have 48 E-VQA facts: editing all leaves none for the locality questions.
    args = ["-q", "world", "--out", str(tmp_path / "small"), "--entities", "8", "--eval-vqa", "48",
            "--train-vqa", "6", "--eval-caption", "2", "--train-caption", "2", "--renderings", "1"]
    assert main(args) == 2
    assert "48 eval edits leave no unedited fact" in capsys.readouterr().err
    assert not (tmp_path / "small").exists()


def test_world_renderings_default_is_the_library_default(monkeypatch, tmp_path):
    import dualedit.world

    seen = {}
    monkeypatch.setattr(dualedit.world, "build_world", lambda out, **kw: seen.update(kw) or out)
    assert main(["-q", "world", "--out", str(tmp_path / "w")]) == 0
    assert "renderings_per_entity" not in seen and seen["n_entities"] == 48


def test_pretrain_step_options_replace_the_arch_defaults_only_when_given(monkeypatch, tmp_path):
    import importlib

    # The package exports a function of the same name as the module.
    pretrain_module = importlib.import_module("dualedit.small_vlm.pretrain")

    calls = []
    monkeypatch.setattr(pretrain_module, "pretrain", lambda *a, **kw: calls.append(kw) or {})
    base = ["-q", "pretrain", "--world", str(tmp_path), "--arch", "blip2", "--out", str(tmp_path / "m")]
    assert main(base) == 0
    assert calls[-1]["settings"] is None  # the defaults: cached default models stay valid
    assert main(base + ["--steps", "4000", "--vision-steps", "3000"]) == 0
    settings = calls[-1]["settings"]
    default = pretrain_module.DEFAULT_SETTINGS["blip2"]
    assert (settings.steps, settings.vision_steps) == (4000, 3000)
    assert settings.vision_lr == default.vision_lr and settings.lr == default.lr
    assert main(base + ["--steps", "1500"]) == 0
    assert (calls[-1]["settings"].steps, calls[-1]["settings"].vision_steps) == (1500, default.vision_steps)


def test_demo_train_steps_replace_only_the_budget(monkeypatch, tmp_path, capsys):
    import dualedit.demo

    calls = []
    monkeypatch.setattr(dualedit.demo, "run_demo", lambda **kw: calls.append(kw) or "table")
    assert main(["-q", "demo", "--out", str(tmp_path)]) == 0
    assert calls[-1]["train_steps"] is None  # each trained method's own recipe
    assert main(["-q", "demo", "--out", str(tmp_path), "--train-steps", "3000"]) == 0
    assert calls[-1]["train_steps"] == 3000


def test_broken_model_folders_and_inputs_are_one_line_errors(tmp_path, tiny_factory, capsys, tiny_image_dir):
    model, processor = tiny_factory("llava")
    good = tmp_path / "model"
    model.save_pretrained(good)
    processor.save_pretrained(good)

    def copy_without(name, *drop):
        folder = tmp_path / name
        folder.mkdir()
        for f in good.iterdir():
            if f.name not in drop:
                (folder / f.name).write_bytes(f.read_bytes())
        return folder

    no_weights = copy_without("no-weights", "model.safetensors")
    no_tokenizer = copy_without("no-tokenizer", "tokenizer.json")
    damaged = copy_without("damaged")
    weights = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tiny_image_dir / "red.png").read_bytes()[:40])
    edit = ["-q", "edit", "--method", "ft-l", "--prompt", "what is it?", "--target", "a ball"]
    cases = [
        ([*edit, "--model", str(no_weights)], "has no weights"),
        ([*edit, "--model", str(no_tokenizer)], "has no tokenizer"),
        ([*edit, "--model", str(damaged)], "weights cannot be read"),
        ([*edit, "--model", str(good), "--image", str(truncated)], "truncated.png is not a readable image"),
        (["-q", "train", "--method", "dualedit", "--model", str(good), "--data", str(tmp_path),
          "--out", str(truncated)], "exists and is not a folder"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "dualedit: error:" in line]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
