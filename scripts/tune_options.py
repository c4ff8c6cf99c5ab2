"""Choose an untrained method's options on the validation edits of the train split (never the
eval split): a grid of option values, one evaluation per combination, a table and JSON.

Usage:
    python scripts/tune_options.py --method ft-l --model MODEL --data WORLD --task vqa \\
        --grid steps=10,20,40 --grid lr=1e-4,5e-4,2e-3 --out tune.json

Each combination is scored on the validation edits (`dualedit eval --split val`: the selection
training holds out) with the paper's scorer, without generation; the table is sorted by Avg (the
mean of Rel, T-Gen, V-Gen, T-Loc and M-Loc) and the best row is what to record as the method's
default for that backbone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from dualedit.evaluate import load_vlm, run_eval
from dualedit.io import atomic_write_text
from dualedit.options import parse_option_pairs

METRICS = ("rel", "t_gen", "v_gen", "t_loc", "m_loc", "avg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--task", choices=["vqa", "caption"], default="vqa")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="fixed options for every combination")
    parser.add_argument("--out", type=Path, default=None, help="JSON of every row")
    args = parser.parse_args()
    keys, values = [], []
    for item in args.grid:
        key, _, listed = item.partition("=")
        keys.append(key)
        values.append([parse_option_pairs([f"{key}={v}"])[key] for v in listed.split(",")])
    fixed = parse_option_pairs(args.option)
    model, processor = load_vlm(args.model)
    rows = []
    for combination in itertools.product(*values):
        options = {**fixed, **dict(zip(keys, combination, strict=True))}
        start = time.perf_counter()
        results = run_eval(
            model_and_processor=(model, processor),
            data_root=args.data,
            task=args.task,
            split="val",
            method=args.method,
            editor_options=options,
            generation=False,
            progress=False,
        )
        means = results.runs[0].means
        rows.append({"options": options, **{m: means[m] for m in METRICS},
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda row: -row["avg"])
    print(f"\n{args.method} on {args.model.name} {args.task} validation edits (best first)")
    print("| options | " + " | ".join(METRICS) + " | s |")
    print("|---|" + "---:|" * (len(METRICS) + 1))
    for row in rows:
        cells = " | ".join(f"{row[m]:.1f}" for m in METRICS)
        print(f"| {row['options']} | {cells} | {row['seconds']} |")
    if args.out is not None:
        atomic_write_text(args.out, json.dumps({"method": args.method, "model": str(args.model),
                                                "task": args.task, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
