"""The `dualedit` command: parse arguments, call the library, print.

Every subcommand imports what it needs lazily so that `dualedit --help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path


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
    from dualedit.small_vlm.pretrain import pretrain

    import dataclasses

    from dualedit.small_vlm.pretrain import DEFAULT_SETTINGS

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


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from dualedit.data.stats import dataset_stats, format_stats

    rows = dataset_stats(args.root, require_images=args.require_images)
    print(format_stats(rows))
    return 0


def parse_options(pairs: list[str]) -> dict:
    """`["tau=0.7", "gate_key=last_position", "gate=false"]` -> {"tau": 0.7, ...}.

    Values are read as JSON when they parse (numbers, true/false, null), else kept as strings.

    Raises:
        ValueError: an item without "=" or with an empty key.
    """
    options: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--editor-option {pair!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _cmd_eval(args: argparse.Namespace) -> int:
    from dualedit.evaluate import run_eval

    editor_options = parse_options(args.editor_option)
    if args.editor:
        editor_options["pretrained"] = str(args.editor)
    results = run_eval(
        model_path=args.model,
        data_root=args.data,
        task=args.task,
        split=args.split,
        method=args.method,
        editor_options=editor_options or None,
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

    given = {
        "lr": args.lr,
        "batch_size": args.batch_size,
        "max_steps": args.steps,
        "eval_every": args.eval_every,
        "patience": args.patience,
        "seed": args.seed,
        "text_loc_kl": not args.no_text_loc_kl,
    }
    return TrainSettings(**{k: v for k, v in given.items() if v is not None})


def _adapter_config(args: argparse.Namespace) -> dict:
    given = {
        "text_layer": args.text_layer,
        "visual_layer": args.visual_layer,
        "width": args.width,
        "heads": args.heads,
        "use_text": False if args.visual_only else None,
        "use_visual": False if args.text_only else None,
        "tau": args.tau,
        "gate_key": args.gate_key,
        "text_keys": args.text_keys,
        "text_prompt_end": False if args.released_text_positions else None,
    }
    return {k: v for k, v in given.items() if v is not None}


def _cmd_train(args: argparse.Namespace) -> int:
    from dualedit.data.mmedit import load_split
    from dualedit.evaluate import load_vlm
    from dualedit.train import train_dualedit

    model, processor = load_vlm(args.model)
    result = train_dualedit(
        model,
        processor,
        load_split(args.data, args.task, "train"),
        config=_adapter_config(args),
        settings=_train_settings(args),
        out_dir=args.out,
        resume=not args.no_resume,
        progress=not args.quiet,
        calibrate_tau=args.tau is None,
        calibration=args.calibration,
    )
    print(
        f"trained {result.steps} steps ({result.stop_reason}); best validation score "
        f"{result.best_score:.2f} at step {result.best_step}; adapters in {result.best_dir}"
    )
    if result.tau is not None:
        rates = ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.tau.pass_rates.items())
        print(f"gate threshold tau {result.tau.tau:.4f} chosen on {result.tau.edits} validation "
              f"edits ({result.tau.mode}; right decisions {100 * result.tau.accuracy:.1f}%; "
              f"pass rates: {rates})")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from dualedit.data.mmedit import load_split
    from dualedit.evaluate import load_vlm
    from dualedit.train import calibrate_adapters

    model, processor = load_vlm(args.model)
    choice = calibrate_adapters(
        model,
        processor,
        args.editor,
        load_split(args.data, args.task, "train"),
        out_dir=args.out,
        val_edits=args.val_edits,
        mode=args.calibration,
        gate_key=args.gate_key,
    )
    rates = ", ".join(f"{k} {100 * v:.1f}%" for k, v in choice.pass_rates.items())
    print(f"gate threshold tau {choice.tau:.4f} chosen on {choice.edits} validation edits "
          f"({choice.mode}; right decisions {100 * choice.accuracy:.1f}%; pass rates: {rates}); "
          f"adapters saved in {args.out or args.editor}")
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
    )
    print(f"edit: {args.prompt!r} -> {args.target!r}")
    for row in report:
        print(f"ask:    {row['question']!r} (image: {row['image']})")
        print(f"  before: {row['before']!r}")
        print(f"  after:  {row['after']!r}  (gate similarity {row['similarity']:.3f}, "
              f"{'edited' if row['edited'] else 'not edited'})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dualedit.demo import DEMO_TRAIN_SETTINGS, run_demo

    table = run_demo(
        out_dir=args.out,
        cache_dir=args.cache,
        seed=args.seed,
        limit=args.limit,
        methods=args.methods,
        archs=args.archs,
        progress=not args.quiet,
        threads=args.threads,
        train_settings=(
            None if args.train_steps is None
            else dataclasses.replace(DEMO_TRAIN_SETTINGS, max_steps=args.train_steps)
        ),
    )
    print(table)
    print(f"results written to {Path(args.out) / 'results.json'}")
    return 0


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

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("stats", help="count and check every record of an MMEdit folder")
    s.add_argument("root", type=Path, help="folder holding vqa/ and caption/")
    s.add_argument("--require-images", action="store_true", help="a missing image is an error")
    s.set_defaults(func=_cmd_data_stats)

    p = sub.add_parser("eval", help="evaluate an editing method on E-VQA or E-IC")
    p.add_argument("--method", required=True, help="editing method: none, ft-l, dualedit")
    p.add_argument("--editor", type=Path, default=None,
                   help="trained adapters for --method dualedit (a `dualedit train` best/ folder)")
    p.add_argument("--editor-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an editor option, repeatable; for dualedit any DualEditConfig field that "
                        "does not shape the weights, e.g. gate_key=last_position, tau=0.7, "
                        "gate=false, use_visual=false")
    p.add_argument("--model", required=True, type=Path, help="a VLM folder (save_pretrained)")
    p.add_argument("--data", required=True, type=Path, help="folder holding vqa/ and caption/")
    p.add_argument("--task", choices=["vqa", "caption"], default="vqa")
    p.add_argument("--split", choices=["train", "eval"], default="eval")
    p.add_argument("--protocol", choices=["single", "sequential"], default="single")
    p.add_argument("--n", type=int, nargs="+", default=[1, 10, 100], help="sequential N values")
    p.add_argument("--scorer", choices=["paper", "easyedit"], default="paper")
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-generation", action="store_true", help="skip generation exact match")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json and table.md")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("train", help="train DualEdit adapters on a dataset's train split")
    p.add_argument("--model", required=True, type=Path, help="a VLM folder (save_pretrained)")
    p.add_argument("--data", required=True, type=Path, help="folder holding vqa/ and caption/")
    p.add_argument("--task", choices=["vqa", "caption"], default="vqa")
    p.add_argument("--out", required=True, type=Path, help="run folder (best/, last/, checkpoint/)")
    p.add_argument("--steps", type=int, default=None, help="step budget")
    p.add_argument("--batch-size", type=int, default=None, help="edits per step, all processes")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--patience", type=int, default=None, help="validations without improvement")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-text-loc-kl", action="store_true",
                   help="drop the text-only KL term, as the released code does")
    p.add_argument("--text-layer", type=int, default=None)
    p.add_argument("--visual-layer", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    only = p.add_mutually_exclusive_group()
    only.add_argument("--text-only", action="store_true", help="ablation: text adapter only")
    only.add_argument("--visual-only", action="store_true", help="ablation: visual adapter only")
    p.add_argument("--tau", type=float, default=None,
                   help="gate threshold saved with the adapters (default: chosen on the "
                        "validation edits after training)")
    p.add_argument("--gate-key", default=None, help="gate key saved with the adapters",
                   choices=["prompt_end", "last_position", "prompt_end_image",
                            "prompt_end_and_image", "prompt_end_image_groups"])
    p.add_argument("--calibration", choices=["single", "sequential"], default="single",
                   help="how the validation edits are stored while tau is chosen: one at a "
                   "time, or all at once as in the sequential protocol")
    p.add_argument("--text-keys", choices=["all", "text", "answer"], default=None,
                   help="edit positions the text adapter attends to (text: non-image; "
                   "answer: last prompt token and target)")
    p.add_argument("--released-text-positions", action="store_true",
                   help="the text adapter stops before the last prompt token, as released")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("calibrate", help="choose the gate threshold of trained adapters on "
                       "the validation edits of the train split")
    p.add_argument("--model", required=True, type=Path, help="a VLM folder (save_pretrained)")
    p.add_argument("--editor", required=True, type=Path, help="trained adapters (save_pretrained)")
    p.add_argument("--data", required=True, type=Path, help="folder holding vqa/ and caption/")
    p.add_argument("--task", choices=["vqa", "caption"], default="vqa")
    p.add_argument("--out", type=Path, default=None,
                   help="where to save the calibrated adapters (default: --editor, in place)")
    p.add_argument("--val-edits", type=int, default=None,
                   help="validation edits training held out (default: train's default)")
    p.add_argument("--calibration", choices=["single", "sequential"], default="single",
                   help="validation edits stored one at a time, or all at once")
    p.add_argument("--gate-key", default=None, help="choose tau for this gate key (saved)",
                   choices=["prompt_end", "last_position", "prompt_end_image",
                            "prompt_end_and_image", "prompt_end_image_groups"])
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("edit", help="apply one edit and print answers before and after")
    p.add_argument("--model", required=True, type=Path, help="a VLM folder (save_pretrained)")
    p.add_argument("--editor", required=True, type=Path, help="trained adapters (save_pretrained)")
    p.add_argument("--image", type=Path, default=None, help="the edit's image")
    p.add_argument("--prompt", required=True, help="the edit's prompt, as the model is asked")
    p.add_argument("--target", required=True, help="the new answer")
    p.add_argument("--ask", nargs="+", default=None, help="questions to ask (default: --prompt)")
    p.add_argument("--ask-image", nargs="+", type=Path, default=None,
                   help="image per question (default: --image)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.set_defaults(func=_cmd_edit)

    p = sub.add_parser("demo", help="world -> small VLMs -> evaluation of the methods -> table")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--cache", type=Path, default=None, help="default: ~/.cache/dualedit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="records per dataset (default: all)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="default: none ft-l dualedit (DualEdit trains its adapters first)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="DualEdit adapter training steps per backbone and dataset (default: the "
                   "demo's budget, 600); a cached run trains on to a larger budget")
    p.add_argument("--archs", nargs="+", default=["llava", "blip2"], choices=["llava", "blip2"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the whole demo (default: torch's; 1 when the CPU is shared)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"dualedit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
