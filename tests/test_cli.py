"""The command line as a user runs it: world, data stats, error exit codes."""

from __future__ import annotations

import json

import pytest

from dualedit.cli import build_parser, main, parse_options

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
    assert parse_options(args.editor_option) == {"tau": 0.7, "gate_key": "last_position", "gate": False}
    with pytest.raises(ValueError, match="'tau': expected KEY=VALUE"):
        parse_options(["tau"])
