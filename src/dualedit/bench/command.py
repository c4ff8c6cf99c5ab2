"""The `dualedit bench` command line (registered by `dualedit.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def run_bench_quality(args: argparse.Namespace) -> int:
    from dualedit.bench.quality import run_quality_bench

    table = run_quality_bench(
        args.out,
        methods=args.methods,
        backbones=args.backbones,
        datasets=args.datasets,
        protocol=args.protocol,
        n_values=tuple(args.n),
        seeds=tuple(args.seeds),
        limit=args.limit,
        cache_dir=args.cache,
        model=args.model,
        data=args.data,
        apply_samples=args.apply_samples,
        progress=not args.quiet,
        threads=args.threads,
        train_steps=args.train_steps,
        retime=args.retime,
    )
    print(table)
    print(f"results written to {Path(args.out) / 'results.json'}")
    return 0


def run_bench_ablations(args: argparse.Namespace) -> int:
    from dualedit.bench.ablations import run_ablation_bench

    table = run_ablation_bench(
        args.out, backbones=args.backbones, datasets=args.datasets, seed=args.seed,
        limit=args.limit, cache_dir=args.cache, progress=not args.quiet, threads=args.threads,
        train_steps=args.train_steps,
    )
    print(table)
    print(f"results written to {Path(args.out) / 'results.json'}")
    return 0


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`dualedit bench quality ...` on the CLI's subcommands."""
    p = sub.add_parser("bench", help="benchmarks of the registered methods")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    q = bench_sub.add_parser(
        "quality", help="methods x backbones x datasets (x seeds) -> a table shaped like the "
        "paper's Table 2, with training time, apply time and bytes per edit; resumable")
    q.add_argument("--out", required=True, type=Path,
                   help="folder for results.json, table.md and cells/ (reused on a rerun); "
                        "sequential: also sequential_{metric}.png, the metrics against N")
    q.add_argument("--methods", nargs="+", default=None,
                   help="registered methods or `all` (default: all)")
    q.add_argument("--backbones", nargs="+", default=None, choices=["llava", "blip2"],
                   help="the built-in world's small models (default: both)")
    q.add_argument("--datasets", nargs="+", default=["vqa", "caption"], choices=["vqa", "caption"],
                   help="vqa: E-VQA, caption: E-IC (default: both)")
    q.add_argument("--protocol", choices=["single", "sequential"], default="single")
    q.add_argument("--n", type=int, nargs="+", default=[1, 10, 100], help="sequential N values")
    q.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="world seeds, each with its own world and models (several: mean ± std)")
    q.add_argument("--limit", type=int, default=None, help="records per dataset (default: all)")
    q.add_argument("--cache", "--cache-dir", dest="cache", type=Path, default=None,
                   help="worlds, models and trained runs (default: ~/.cache/dualedit, the demo's)")
    q.add_argument("--model", type=Path, default=None,
                   help="a VLM folder to benchmark instead of the built-in ones (with --data)")
    q.add_argument("--data", type=Path, default=None,
                   help="an MMEdit folder (vqa/, caption/, images/) for --model; a trained "
                        "method is trained on its train split")
    q.add_argument("--apply-samples", type=int, default=10,
                   help="eval records one edit's apply is timed on (0: not timed)")
    q.add_argument("--train-steps", type=int, default=None,
                   help="training steps of each trained method (default: its recipe's)")
    q.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the whole bench (default: torch's)")
    q.add_argument("--retime", action="store_true",
                   help="time apply again for cells reused from an earlier run (scores kept), so "
                        "all timings and ratios come from this run")
    q.set_defaults(func=run_bench_quality)

    a = bench_sub.add_parser(
        "ablations", help="the DualEdit paper's Table 3 on the built-in world: layer pairs "
        "without gate (mapped by depth fraction), text-only / visual-only / both with gate; "
        "resumable")
    a.add_argument("--out", required=True, type=Path,
                   help="folder for results.json, table.md and cells/ (reused on a rerun)")
    a.add_argument("--backbones", nargs="+", default=None, choices=["llava", "blip2"],
                   help="the built-in world's small models (default: both)")
    a.add_argument("--datasets", nargs="+", default=["vqa"], choices=["vqa", "caption"],
                   help="vqa: E-VQA, caption: E-IC (default: vqa)")
    a.add_argument("--seed", type=int, default=0, help="world seed")
    a.add_argument("--limit", type=int, default=None, help="records per dataset (default: all)")
    a.add_argument("--cache", "--cache-dir", dest="cache", type=Path, default=None,
                   help="worlds, models and trained runs (default: ~/.cache/dualedit, the demo's)")
    a.add_argument("--train-steps", type=int, default=None,
                   help="training steps of every row (default: DualEdit's recipe)")
    a.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the whole bench (default: torch's)")
    a.set_defaults(func=run_bench_ablations)
