"""The validation scores of trained runs, from their train_log.json: a Markdown table per run and
one JSON file of every validation entry (the evidence a recipe was chosen on, never the eval
split).

Usage:
    python scripts/validation_curves.py OUT.json RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a training run folder (`dualedit train --out`, or the cache's
`trained/<method>/<arch>-<task>-seed<seed>`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = ("rel", "t_gen", "v_gen", "t_loc", "m_loc", "score")


def curves(run: Path) -> dict:
    log = json.loads((run / "train_log.json").read_text(encoding="utf-8"))
    entries = [e for e in log["entries"] if e.get("kind") == "eval"]
    return {
        "run": str(run),
        "method": log.get("meta", {}).get("method"),
        "best_step": log.get("best_step"),
        "best_score": log.get("best_score"),
        "evals": [{k: e.get(k) for k in ("step", "elapsed_s", *METRICS)} for e in entries],
    }


def markdown(entry: dict) -> str:
    lines = [f"{entry['run']} (best {entry['best_score']:.2f} at step {entry['best_step']})",
             "", "| step | " + " | ".join(METRICS) + " | elapsed s |",
             "|---:|" + "---:|" * (len(METRICS) + 1)]
    for e in entry["evals"]:
        values = " | ".join(f"{e[k]:.1f}" for k in METRICS)
        lines.append(f"| {e['step']} | {values} | {e['elapsed_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    out, runs = Path(argv[0]), [Path(p) for p in argv[1:]]
    found = [curves(run) for run in runs]
    out.write_text(json.dumps(found, indent=2) + "\n", encoding="utf-8")
    print("\n".join(markdown(entry) for entry in found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
