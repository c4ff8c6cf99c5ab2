"""Print a compact Markdown table (the README's results table) from a `dualedit bench quality`
results.json: one row per method x backbone x dataset (x N), numbers rounded for reading.

    python scripts/summary_table.py runs/bench-quality/results.json [--columns ...] [--train]
"""

from __future__ import annotations

import argparse
import json

BACKBONES = {"llava": "LLaVA", "blip2": "BLIP-2"}
DATASETS = {"vqa": "E-VQA", "caption": "E-IC"}
COLUMNS = {"rel": "Rel", "t_gen": "T-Gen", "v_gen": "V-Gen", "t_loc": "T-Loc", "m_loc": "M-Loc",
           "avg": "Avg", "m_loc_hard": "Hard M-Loc", "gen_em": "Gen-EM", "train_s": "train s",
           "apply_ms": "apply ms", "apply_x_reference": "apply × DualEdit",
           "bytes_per_edit": "bytes/edit"}
DEFAULT = ["rel", "t_gen", "v_gen", "t_loc", "m_loc", "avg", "m_loc_hard", "gen_em",
           "apply_x_reference"]


def number(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "apply_x_reference":
        return f"{value:.2f}"
    if key == "apply_ms":
        return f"{value:.2f}"
    if key in ("train_s", "bytes_per_edit"):
        return f"{value:.0f}"
    return f"{value:.1f}".removesuffix(".0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--columns", nargs="+", default=DEFAULT, choices=sorted(COLUMNS))
    args = parser.parse_args()
    rows = json.loads(open(args.results, encoding="utf-8").read())["rows"]
    sequential = any(row.get("n_edits") is not None for row in rows)
    head = ["method", "backbone", "dataset"] + (["N"] if sequential else [])
    head += [COLUMNS[c] for c in args.columns]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * (3 + sequential) + ["---:"] * len(args.columns)) + "|")
    for row in rows:
        if row.get("status") != "done":
            continue
        cells = [row["method"], BACKBONES.get(row["backbone"], row["backbone"]),
                 DATASETS.get(row["dataset"], row["dataset"])]
        if sequential:
            cells.append(str(row.get("n_edits")))
        cells += [number(c, row["mean"].get(c)) for c in args.columns]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
