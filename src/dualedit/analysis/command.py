"""The `dualedit analyze` command line (registered by `dualedit.cli`): one subcommand per
analysis, each writing PNG figures and a JSON under `--out`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

KINDS = ("attention", "noise", "layers", "finalists", "gate", "recommend")


def _data(args: argparse.Namespace, attn_implementation: str | None = None):
    from dualedit.analysis.inputs import load_analysis_data

    return load_analysis_data(args.model, args.data, args.task, split=args.split,
                              samples=args.samples, seed=args.seed,
                              attn_implementation=attn_implementation)


def run_analyze(args: argparse.Namespace) -> int:
    from dualedit.numerics import cpu_threads

    with cpu_threads(args.threads):
        written = _ANALYSES[args.analyze_command](args)
    print(written)
    return 0


def _attention(args: argparse.Namespace) -> str:
    from dualedit.analysis.attention import run_attention

    result = run_attention(_data(args), args.out, batch_size=args.batch_size, top_k=args.top_k,
                           progress=not args.quiet)
    return f"attention of {result['samples']} samples over {len(result['layers'])} layers " \
           f"written to {args.out}"


def _noise(args: argparse.Namespace) -> str:
    from dualedit.analysis.noise import run_noise

    result = run_noise(_data(args), args.out, sigmas=tuple(args.sigmas), scale=args.scale,
                       layers=args.layers, batch_size=args.batch_size, seed=args.seed,
                       progress=not args.quiet)
    return f"noise sensitivity over {len(result['layers'])} layers written to {args.out}"


def _gate(args: argparse.Namespace) -> str:
    from dualedit.analysis.gate import run_gate

    result = run_gate(_data(args), args.out, layers=args.layers, keys=args.keys,
                      batch_size=args.batch_size, progress=not args.quiet, stored=args.stored)
    best = result.get("overall_best") or {}
    line = (f"gate separability written to {args.out}; best: {best.get('key')} at layer "
            f"{best.get('layer')}, tau {best.get('tau')}, balanced error "
            f"{best.get('balanced_error')}")
    if "stored" in result:
        one, radius = result["stored"]["best"]["tau"], result["stored"]["best"]["radius"]
        line += (f"; {result['stored']['edits']} edits stored: one tau best "
                 f"{one['key']} at layer {one['layer']} (tau {one['tau']:.3f}, mean right "
                 f"{one['mean']:.3f}), per-edit radius best {radius['key']} at layer "
                 f"{radius['layer']} (tau0 {radius['tau0']:.3f}, mean right {radius['mean']:.3f})")
    return line


def _train_settings(args: argparse.Namespace, base, *, eval_at_end: bool):
    """`base` with the --settings file's fields over it, then the flags over those."""
    from dualedit.options import read_json_object
    from dualedit.train import TrainSettings

    if args.settings is not None:
        given_file = read_json_object(args.settings, what="--settings")
        base = TrainSettings.from_dict({**dataclasses.asdict(base), **given_file},
                                       where=str(args.settings))
    given = {"max_steps": args.steps, "lr": args.lr, "batch_size": args.train_batch_size,
             "seed": args.train_seed}
    settings = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    if args.steps is not None and eval_at_end:
        settings = dataclasses.replace(settings, eval_every=args.steps)
    return settings


def _layers(args: argparse.Namespace) -> str:
    from dualedit.analysis.layers import SWEEP_SETTINGS, run_layer_sweep
    from dualedit.evaluate import load_vlm

    settings = _train_settings(args, SWEEP_SETTINGS, eval_at_end=True)
    model, processor = load_vlm(args.model)
    result = run_layer_sweep(
        model, processor, args.data, args.out, task=args.task, sweeps=args.sweeps,
        layers=args.layers, settings=settings, limit=args.limit, progress=not args.quiet,
        source={"model": str(args.model), "data": str(args.data)},
    )
    return f"{len(result['variants'])} layer variants written to {args.out}"


def _finalists(args: argparse.Namespace) -> str:
    from dualedit.analysis.finalists import run_finalists
    from dualedit.editors.registry import get_method
    from dualedit.evaluate import load_vlm
    from dualedit.train import TrainSettings

    recipe = get_method("dualedit").recipe.train or TrainSettings()
    settings = _train_settings(args, recipe, eval_at_end=False)
    if args.steps is not None and settings.eval_every > settings.max_steps:
        settings = dataclasses.replace(settings, eval_every=settings.max_steps)
    include = None if args.include is None else [tuple(p) for p in args.include]
    model, processor = load_vlm(args.model)
    result = run_finalists(
        model, processor, args.data, args.out, sweep=args.sweep, task=args.task, top=args.top,
        include=include, settings=settings, limit=args.limit, progress=not args.quiet,
        source={"model": str(args.model), "data": str(args.data)},
    )
    chosen = result["chosen"]
    return (f"{len(result['finalists'])} finalists written to {args.out}; chosen "
            f"({chosen['text_layer']}, {chosen['visual_layer']}): {chosen['reason']}")


def _recommend(args: argparse.Namespace) -> str:
    import json

    from dualedit.analysis.recommend import recommend

    result = recommend(args.source or args.out, out_dir=args.out,
                       allow_last_position=args.allow_last_position)
    lines = [json.dumps(result["recommendation"])] + result["reasons"]
    return "\n".join(lines) + f"\nwritten to {Path(args.out) / 'recommendation.json'}"


_ANALYSES = {"attention": _attention, "noise": _noise, "layers": _layers,
             "finalists": _finalists, "gate": _gate, "recommend": _recommend}


def _common(p: argparse.ArgumentParser, *, samples: bool = True) -> None:
    p.add_argument("--model", required=True, type=Path, help="a VLM folder (save_pretrained)")
    p.add_argument("--data", required=True, type=Path, help="folder holding vqa/ and caption/")
    p.add_argument("--task", choices=["vqa", "caption"], default="vqa")
    p.add_argument("--out", required=True, type=Path, help="folder for the figures and JSON")
    if samples:
        p.add_argument("--split", choices=["train", "val", "eval"], default="train",
                       help="records to analyse (default train: the eval split stays unseen)")
        p.add_argument("--samples", type=int, default=64, help="records drawn from the split")
        p.add_argument("--seed", type=int, default=0, help="which records are drawn")
        p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _training_flags(p: argparse.ArgumentParser, defaults: str, *, steps: int) -> None:
    p.add_argument("--settings", type=Path, default=None,
                   help=f"each training's TrainSettings fields as a JSON object, over {defaults}; "
                        "the flags below override it")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per variant (default {steps})")
    p.add_argument("--lr", type=float, default=None, help="default 5e-3")
    p.add_argument("--train-batch-size", type=int, default=None, help="default 8")
    p.add_argument("--train-seed", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="score only N validation edits")


def add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    """`dualedit analyze <kind> ...` on the CLI's subcommands."""
    p = sub.add_parser("analyze", help="the analyses that choose DualEdit's layers and gate "
                       "(figures + JSON)")
    kinds = p.add_subparsers(dest="analyze_command", required=True)

    a = kinds.add_parser("attention", help="per layer, the last prompt token's attention to "
                         "text and image positions (the paper's Figure 1)")
    _common(a)
    a.add_argument("--top-k", type=int, default=3, help="the top image positions averaged")

    n = kinds.add_parser("noise", help="KL of the answer when Gaussian noise is added to the "
                         "text, image or all positions of one layer (Figure 2)")
    _common(n)
    n.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    n.add_argument("--scale", choices=["relative", "absolute"], default="relative",
                   help="relative: noise std = sigma x the RMS of the noised states")
    n.add_argument("--layers", type=int, nargs="+", default=None, help="default: every layer")

    g = kinds.add_parser("gate", help="cosine similarity of each edit to its generality and "
                         "locality inputs per key kind; the best threshold (Figure 4)")
    _common(g)
    g.add_argument("--layers", type=int, nargs="+", default=None, help="default: every layer")
    g.add_argument("--keys", nargs="+", default=None, help="key kinds (default: all)")
    g.add_argument("--stored", action="store_true",
                   help="also store every analysed record's edit at once and score the "
                        "nearest-of-many decisions (one tau, per-edit GRACE radius, image "
                        "first then question); use e.g. "
                        "--split eval --samples 1000")

    s = kinds.add_parser("layers", help="train text-only, visual-only and paired adapters at "
                         "each layer, score on the validation edits (Table 1, Figure 5)")
    _common(s, samples=False)
    s.add_argument("--sweeps", nargs="+", choices=["text", "visual", "pairs"],
                   default=["text", "visual", "pairs"])
    s.add_argument("--layers", type=int, nargs="+", default=None, help="default: every layer")
    _training_flags(s, "the sweep's defaults (150 steps, lr 5e-3, batch 8, validation at the "
                    "end)", steps=150)

    f = kinds.add_parser("finalists", help="train the layer sweep's best pairs (and the "
                         "recipe's) again at the full recipe budget; choose on the validation "
                         "edits")
    _common(f, samples=False)
    f.add_argument("--sweep", type=Path, default=None,
                   help="folder of the layer sweep's layers.json, of any task (default --out)")
    f.add_argument("--top", type=int, default=2, help="how many of the sweep's best pairs")
    f.add_argument("--include", type=int, nargs=2, action="append", default=None,
                   metavar=("TEXT", "VISUAL"),
                   help="a pair trained besides them, kept unless beaten by more than a point "
                        "(repeatable; default the method recipe's layers)")
    _training_flags(f, "the method recipe's training (600 steps, lr 5e-3, batch 8, validation "
                    "every 300)", steps=600)

    r = kinds.add_parser("recommend", help="(text layer, visual layer, gate key, tau) from the "
                         "analyses in a folder")
    r.add_argument("--out", required=True, type=Path, help="folder for recommendation.json")
    r.add_argument("--from", dest="source", type=Path, nargs="+", default=None,
                   help="folders holding layers.json / noise.json / gate.json, each analysis read "
                        "from the first that has it (default --out)")
    r.add_argument("--allow-last-position", action="store_true",
                   help="let the gate key be the last position (it reads the answer under "
                        "teacher forcing)")
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_analyze)
