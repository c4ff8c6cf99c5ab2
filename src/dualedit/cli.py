"""The `dualedit` command: parse arguments, call the library, print.

Every subcommand imports what it needs lazily so that `dualedit --help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from dualedit.analysis.command import add_analyze_parser
from dualedit.bench.command import add_bench_parser

# train.settings.LR_SCHEDULES, spelled here so that parsing arguments imports no torch (a test
# keeps the two equal).
TRAIN_LR_SCHEDULES = ("constant", "cosine", "linear")


def _cmd_world(args: argparse.Namespace) -> int:
    from dualedit.world import build_world

    # Only what was given: build_world's own defaults hold for the rest.
    optional = {"renderings_per_entity": args.renderings}
    out = build_world(
        args.out,
        seed=args.seed,
        image_size=args.image_size,
        n_entities=args.entities,
        n_train_vqa=args.train_vqa,
        n_eval_vqa=args.eval_vqa,
        n_train_caption=args.train_caption,
        n_eval_caption=args.eval_caption,
        progress=not args.quiet,
        **{k: v for k, v in optional.items() if v is not None},
    )
    print(f"world written to {out}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from dualedit.small_vlm.pretrain import DEFAULT_SETTINGS, pretrain

    # Given step counts replace the arch's defaults (and so enter the cache key); none given:
    # exactly the default settings, so models cached with them are reused.
    steps = {"steps": args.steps, "vision_steps": args.vision_steps}
    given = {k: v for k, v in steps.items() if v is not None}
    settings = dataclasses.replace(DEFAULT_SETTINGS[args.arch], **given) if given else None
    metrics = pretrain(
        args.world, args.arch, args.out, seed=args.seed, progress=not args.quiet, force=args.force,
        settings=settings, threads=args.threads, tie_embeddings=not args.untied_embeddings,
    )
    acc = metrics.get("heldout_accuracy", {})
    print(f"model written to {args.out}")
    for task, value in sorted(acc.items()):
        if isinstance(value, (int, float)):
            print(f"  held-out answer-token accuracy {task}: {100 * value:.2f}%")
    return 0


def _cmd_pretrain_context(args: argparse.Namespace) -> int:
    from dualedit.small_vlm.context_reading import ContextSettings, teach_context_reading

    given = {"steps": args.steps, "seed": args.seed}
    settings = ContextSettings(**{k: v for k, v in given.items() if v is not None})
    metrics = teach_context_reading(
        args.model, args.world, args.out, settings=settings, progress=not args.quiet,
        threads=args.threads, force=args.force,
    )
    print(f"context-reading variant written to {args.out}")
    for when in ("before", "after"):
        cells = ", ".join(f"{k} {v:.1f}%" for k, v in metrics[when].items())
        print(f"  held-out lessons answered {when}: {cells}")
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from dualedit.data.stats import dataset_stats, format_stats

    rows = dataset_stats(args.root, require_images=args.require_images)
    print(format_stats(rows))
    return 0


def _method_config(args: argparse.Namespace) -> dict:
    """The method's config fields from `--config FILE.json`, then `--option KEY=VALUE` on top."""
    from dualedit.options import parse_option_pairs, read_json_object

    config = {} if args.config is None else read_json_object(args.config, what="--config")
    config.update(parse_option_pairs(args.option))
    return config


def _cmd_methods(args: argparse.Namespace) -> int:
    from dualedit.editors.registry import METHODS

    for name, spec in sorted(METHODS.items()):
        kind = "trained" if spec.trainable else "untrained"
        print(f"{name:<10} {kind:<9} {spec.summary}")
        fields = dataclasses.fields(spec.config)
        if fields:
            shown = ", ".join(f"{f.name}={f.default!r}" for f in fields)
            print(f"{'':<10} options: {shown}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from dualedit.evaluate import run_eval

    options = _method_config(args)
    results = run_eval(
        model_path=args.model,
        data_root=args.data,
        task=args.task,
        split=args.split,
        method=args.method,
        editor_dir=args.editor,
        editor_options=options or None,
        untrained=args.untrained,
        ignore_base_mismatch=args.ignore_base_mismatch,
        protocol=args.protocol,
        n_values=tuple(args.n),
        scorer=args.scorer,
        limit=args.limit,
        batch_size=args.batch_size,
        generation=not args.no_generation,
        out_dir=args.out,
        progress=not args.quiet,
    )
    from dualedit.eval.report import markdown_table

    print(markdown_table(results))
    if args.out:
        print(f"results written to {Path(args.out) / 'results.json'}")
    return 0


def _train_settings(args: argparse.Namespace):
    from dualedit.train import TrainSettings

    base = TrainSettings() if args.settings is None else TrainSettings.from_json(args.settings)
    given = {
        "lr": args.lr,
        "batch_size": args.batch_size,
        "max_steps": args.steps,
        "eval_every": args.eval_every,
        "patience": args.patience,
        "seed": args.seed,
        "text_loc_kl": False if args.no_text_loc_kl else None,
        "checkpoint_every": args.checkpoint_every,
        "lr_schedule": args.lr_schedule,
    }
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def _cmd_train(args: argparse.Namespace) -> int:
    from dualedit.data.mmedit import load_split
    from dualedit.editors.registry import get_method
    from dualedit.evaluate import load_vlm
    from dualedit.options import parse_option_pairs

    spec = get_method(args.method)
    if not spec.trainable:
        raise ValueError(f"method {args.method!r} is not trained (see `dualedit methods`)")
    config = _method_config(args)
    if args.from_recommendation is not None:
        config = {**_recommended(args.from_recommendation, spec.name), **config}
    spec.editor.make_config(config)  # unknown or bad options fail before the model loads
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder (a run folder is made there)")
    settings = _train_settings(args)
    model, processor = load_vlm(args.model)
    result = spec.train(
        model,
        processor,
        load_split(args.data, args.task, "train"),
        config=config,
        settings=settings,
        out_dir=args.out,
        resume=not args.no_resume,
        progress=not args.quiet,
        **parse_option_pairs(args.train_option, flag="--train-option"),
    )
    print(
        f"trained {result.steps} steps ({result.stop_reason}); best validation score "
        f"{result.best_score:.2f} at step {result.best_step}; editor in {result.best_dir}"
    )
    if result.finish is not None:
        print(_describe_finish(result.finish))
    return 0


def _recommended(path: Path, method: str) -> dict:
    """The config fields of a `dualedit analyze recommend` file (under --config / --option)."""
    from dualedit.analysis.recommend import recommendation_options

    options = recommendation_options(path, method=method)
    logging.getLogger("dualedit.cli").info("from %s: %s", path, options)
    return options


def _describe_finish(summary) -> str:
    """One line on what a trained method's last step chose (DualEdit: the gate threshold)."""
    describe = getattr(summary, "describe", None)
    return describe() if callable(describe) else str(summary)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from dualedit.data.mmedit import load_split
    from dualedit.editors.files import saved_method
    from dualedit.editors.registry import get_method
    from dualedit.evaluate import load_vlm
    from dualedit.options import parse_option_pairs

    method = saved_method(args.editor)
    spec = get_method(method)
    if spec.calibrate is None:
        raise ValueError(f"method {method!r} ({args.editor}) has no calibration step")
    model, processor = load_vlm(args.model)
    extra = {"ignore_base_mismatch": True} if args.ignore_base_mismatch else {}
    choice = spec.calibrate(
        model,
        processor,
        args.editor,
        load_split(args.data, args.task, "train"),
        out_dir=args.out,
        val_edits=args.val_edits,
        **parse_option_pairs(args.option),
        **extra,
    )
    print(f"{_describe_finish(choice)}; editor saved in {args.out or args.editor}")
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    from dualedit.editing import edit_and_ask

    report = edit_and_ask(
        model_path=args.model,
        editor_path=args.editor,
        image=args.image,
        prompt=args.prompt,
        target=args.target,
        questions=args.ask,
        ask_images=args.ask_image,
        max_new_tokens=args.max_new_tokens,
        method=args.method,
        options=_method_config(args) or None,
        ignore_base_mismatch=args.ignore_base_mismatch,
    )
    print(f"edit: {args.prompt!r} -> {args.target!r}")
    for row in report:
        print(f"ask:    {row['question']!r} (image: {row['image']})")
        print(f"  before: {row['before']!r}")
        if row["edited"] is None:
            print(f"  after:  {row['after']!r}")
        else:
            print(f"  after:  {row['after']!r}  (gate similarity {row['similarity']:.3f}, "
                  f"{'edited' if row['edited'] else 'not edited'})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dualedit.demo import run_demo

    table = run_demo(
        out_dir=args.out,
        cache_dir=args.cache,
        seed=args.seed,
        limit=args.limit,
        methods=args.methods,
        archs=args.archs,
        progress=not args.quiet,
        threads=args.threads,
        train_steps=args.train_steps,
    )
    print(table)
    print(f"results written to {Path(args.out) / 'results.json'}")
    return 0


def _add_option_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="the method's config as a JSON object (unknown keys are refused)")
    p.add_argument("--option", "--editor-option", dest="option", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="a config field of the method, repeatable, over --config; the value is "
                        "read as JSON when it parses (e.g. tau=0.7, gate=false, layer=4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualedit", description="Edit the knowledge of vision-language models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("world", help="draw the built-in world in the MMEdit file layout")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--entities", type=int, default=48,
                   help="named entities, at most 256 (above 144: 8 shapes and 8 colors instead of 6); "
                        "each has 6 E-VQA facts")
    p.add_argument("--train-vqa", type=int, default=1000)
    p.add_argument("--eval-vqa", type=int, default=200)
    p.add_argument("--train-caption", type=int, default=500)
    p.add_argument("--eval-caption", type=int, default=48, help="at most one per entity")
    p.add_argument("--renderings", type=int, default=None,
                   help="corpus renderings per entity (default 120)")
    p.set_defaults(func=_cmd_world)

    p = sub.add_parser("pretrain", help="pretrain a small VLM on a world")
    p.add_argument("--world", required=True, type=Path)
    p.add_argument("--arch", required=True, choices=["llava", "blip2"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain even if a cached model matches")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 2; use 1 when another job shares the CPU)")
    p.add_argument("--steps", type=int, default=None,
                   help="language-side steps (default: the arch's, llava 400, blip2 1000; more for "
                        "worlds of more entities)")
    p.add_argument("--vision-steps", type=int, default=None,
                   help="vision warm-up steps (default: the arch's, llava 2400, blip2 2000)")
    p.add_argument("--untied-embeddings", action="store_true",
                   help="separate input and output token embeddings (as LLaVA-1.5's Vicuna); "
                        "the default ties them, see dualedit.small_vlm.configs.TIE_EMBEDDINGS")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser(
        "pretrain-context",
        help="teach a pretrained small VLM to read a stated fact from its context (the model "
        "variant for in-context editing, IKE)",
    )
    p.add_argument("--model", required=True, type=Path, help="a model `dualedit pretrain` wrote")
    p.add_argument("--world", required=True, type=Path, help="the world it was pretrained on")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=None, help="lesson steps (default 2000)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--force", action="store_true", help="teach again even if cached")
    p.set_defaults(func=_cmd_pretrain_context)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("stats", help="count and check every record of an MMEdit folder")
    s.add_argument("root", type=Path, help="folder holding vqa/ and caption/")
    s.add_argument("--require-images", action="store_true", help="a missing image is an error")
    s.set_defaults(func=_cmd_data_stats)

    p = sub.add_parser("methods", help="list the registered editing methods and their options")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser("eval", help="evaluate an editing method on E-VQA or E-IC")
    p.add_argument("--method", default=None,
                   help="a registered method (`dualedit methods`); with --editor it is read from "
                        "the folder (and must agree when given)")
    p.add_argument("--editor", type=Path, default=None,
                   help="a saved editor folder (e.g. the best/ folder of `dualedit train`)")
    _add_option_args(p)
    p.add_argument("--untrained", action="store_true",
                   help="allow a trained method without --editor (scores its initialisation)")
    p.add_argument("--model", required=True, type=Path, help="a VLM folder (save_pretrained)")
    p.add_argument("--data", required=True, type=Path, help="folder holding vqa/ and caption/")
    p.add_argument("--task", choices=["vqa", "caption"], default="vqa")
    p.add_argument("--split", choices=["train", "eval", "val"], default="eval",
                   help="val: the validation edits of the train split (for tuning options)")
    p.add_argument("--protocol", choices=["single", "sequential"], default="single")
    p.add_argument("--n", type=int, nargs="+", default=[1, 10, 100], help="sequential N values")
    p.add_argument("--scorer", choices=["paper", "easyedit"], default="paper")
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-generation", action="store_true", help="skip generation exact match")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for results.json and table.md (sequential: also sequential.png, "
                        "the metrics against N)")
    _add_base_mismatch_arg(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("train", help="train a trained method on a dataset's train split")
    p.add_argument("--method", required=True, help="a trained method (`dualedit methods`)")
    p.add_argument("--model", required=True, type=Path, help="a VLM folder (save_pretrained)")
    p.add_argument("--data", required=True, type=Path, help="folder holding vqa/ and caption/")
    p.add_argument("--task", choices=["vqa", "caption"], default="vqa")
    p.add_argument("--out", required=True, type=Path, help="run folder (best/, last/, checkpoint/)")
    _add_option_args(p)
    p.add_argument("--from-recommendation", type=Path, default=None, metavar="FILE",
                   help="DualEdit's layers, gate key and tau from `dualedit analyze recommend`'s "
                        "recommendation.json (--config and --option override it)")
    p.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the method's trainer, repeatable (dualedit: "
                        "calibration=single|sequential, calibrate_tau=false, heads_mlp=N with "
                        "the learned gate key, which training fits and saves unless --option "
                        "gate_key=..., tau=... or gate=false is given)")
    p.add_argument("--settings", type=Path, default=None,
                   help="TrainSettings as a JSON object (the flags below override it)")
    p.add_argument("--steps", type=int, default=None, help="step budget")
    p.add_argument("--batch-size", type=int, default=None, help="edits per step, all processes")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lr-schedule", choices=TRAIN_LR_SCHEDULES, default=None,
                   help="the rate after warm-up: constant (default), or cosine / linear decay "
                        "to 0 at --steps")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--patience", type=int, default=None, help="validations without improvement")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-text-loc-kl", action="store_true",
                   help="drop the text-only KL term, as DualEdit's released code does")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="write the resumable checkpoint every N steps (default 100; and at the end)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("calibrate", help="run a trained method's calibration step again on a "
                       "saved editor (dualedit: choose the gate threshold on the validation edits)")
    p.add_argument("--model", required=True, type=Path, help="a VLM folder (save_pretrained)")
    p.add_argument("--editor", required=True, type=Path, help="a saved editor folder")
    p.add_argument("--data", required=True, type=Path, help="folder holding vqa/ and caption/")
    p.add_argument("--task", choices=["vqa", "caption"], default="vqa")
    p.add_argument("--out", type=Path, default=None,
                   help="where to save the calibrated editor (default: --editor, in place)")
    p.add_argument("--val-edits", type=int, default=None,
                   help="validation edits training held out (default: train's default)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a calibration option, repeatable (dualedit: mode=single|sequential, "
                        "gate_key=..., heads_mlp=N: the learned gate heads' hidden units, "
                        "default 256, 0: linear; stored=N with mode=sequential: choose tau for "
                        "a memory of N edits, the validation edits and other train records')")
    _add_base_mismatch_arg(p)
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("edit", help="apply one edit and print answers before and after")
    p.add_argument("--model", required=True, type=Path, help="a VLM folder (save_pretrained)")
    p.add_argument("--editor", type=Path, default=None,
                   help="a saved editor folder (its method is read from it)")
    p.add_argument("--method", default=None, help="an untrained method, without --editor")
    _add_option_args(p)
    p.add_argument("--image", type=Path, default=None, help="the edit's image")
    p.add_argument("--prompt", required=True, help="the edit's prompt, as the model is asked")
    p.add_argument("--target", required=True, help="the new answer")
    p.add_argument("--ask", nargs="+", default=None, help="questions to ask (default: --prompt)")
    p.add_argument("--ask-image", nargs="+", type=Path, default=None,
                   help="image per question (default: --image)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    _add_base_mismatch_arg(p)
    p.set_defaults(func=_cmd_edit)

    p = sub.add_parser("demo", help="world -> small VLMs -> evaluation of the methods -> table")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--cache", type=Path, default=None, help="default: ~/.cache/dualedit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="records per dataset (default: all)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="default: none ft-l dualedit; `all`: every registered method (a trained "
                        "method trains first, cached)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="training steps of each trained method per backbone and dataset "
                   "(default: its recipe's, dualedit 600); a cached run trains on to a larger "
                   "budget")
    p.add_argument("--archs", nargs="+", default=["llava", "blip2"], choices=["llava", "blip2"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the whole demo (default: torch's; 1 when the CPU is shared)")
    p.set_defaults(func=_cmd_demo)

    add_bench_parser(sub)
    add_analyze_parser(sub)
    return parser


def _add_base_mismatch_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ignore-base-mismatch", action="store_true",
                   help="load an editor saved for other base weights than --model's (only if "
                        "you know they are the same model, e.g. re-quantised)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from safetensors import SafetensorError

    try:
        return args.func(args)
    except (ValueError, OSError, SafetensorError) as err:  # OSError: files, locks (FolderLocked)
        print(f"dualedit: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dualedit: interrupted (a training run resumes from its checkpoint)", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    """The error's message on one line (an OSError without one: its class and errno text)."""
    text = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
