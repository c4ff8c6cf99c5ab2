"""Per question kind of the edit (name, color, shape, ...), the mean of each metric of a
`dualedit eval` run on a built-in world: which kinds of fact an editor fails to change.

    python scripts/metrics_by_kind.py WORLD RESULTS [--split vqa_eval]

WORLD a `dualedit world` folder (its world.json indexes every record's entity and kind), RESULTS
the run's results.json (single protocol; its per-record scores are matched to the records by
index). Prints a Markdown table, kinds as rows, with the record count per kind.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("world", type=Path)
    p.add_argument("results", type=Path)
    p.add_argument("--split", default="vqa_eval", help="world.json record_index key")
    args = p.parse_args()
    index = json.loads((args.world / "world.json").read_text())["record_index"][args.split]
    results = json.loads(args.results.read_text())
    runs = [run for run in results["runs"] if run.get("n_edits") is None]
    if not runs:
        raise SystemExit(f"{args.results}: no single-protocol run (n_edits null)")
    records = runs[0]["records"]
    metrics = [
        k for k, v in records[0].items()
        if k != "index" and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    by_kind: dict[str, list[dict]] = collections.defaultdict(list)
    for record in records:
        i = record["index"]
        if i >= len(index):
            raise SystemExit(f"{args.results}: record {i} is not in {args.split} of {args.world}")
        by_kind[index[i]["kind"]].append(record)
    print("| kind | records | " + " | ".join(metrics) + " |")
    print("|---|---:|" + "---:|" * len(metrics))
    for kind in sorted(by_kind):
        rows = by_kind[kind]
        means = [100 * sum(r[m] for r in rows) / len(rows) for m in metrics]
        print(f"| {kind} | {len(rows)} | " + " | ".join(f"{v:.1f}" for v in means) + " |")


if __name__ == "__main__":
    main()
