"""Start-up cost of a saved edit memory: read whole (every byte read, hashed, copied, split per
edit) against memory-mapped (the keys read and verified, each edit's states read and verified
against the file's block checksums when first used; `dualedit.folders.mapped`).

For each number of edits N, one `EditMemory` of N edits with distinct random states of the small
models' widths is saved; then, interleaved, each variant is timed:

- `load`: `EditMemory.load(folder, lazy=...)` then the first gate lookup of a batch of 8 queries
  (the key matrix built, one matmul): what a process pays before its first edited answer;
- `first_states`: the states of 8 edits gathered (`memory.states`) just after a load, the cost a
  lazy memory defers to the first related input.

The file is in the page cache after the first run (a cold start from disk costs the whole-read
variant more, not the mapped one). Target: a mapped load of 10,000 edits costs no more than a
tenth of the whole read.

Usage: python benchmarks/memory_load.py [--arch llava|blip2|both] [--edits 100 1000 10000]
       [--out FILE] [--repeats N] [--quick]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Variant  # noqa: E402

from dualedit.editors.dualedit.gate import KEY_PARTS, part_width  # noqa: E402
from dualedit.editors.dualedit.memory import EditMemory  # noqa: E402

TARGET_RATIO = 0.10
EDIT_COUNTS = (100, 1000, 10_000)
QUICK_EDIT_COUNTS = (10, 100)
#: Width and rows kept per edit by the small models of the built-in world (text positions of the
#: prompt; every position at the visual layer: the prompt and the image tokens).
HIDDEN = 128
ROWS = {"llava": (16, 16 + 64), "blip2": (16, 16 + 8)}
QUERIES = 8
MODEL_TYPES = {"llava": "llava", "blip2": "blip-2"}


def saved_memory(arch: str, n_edits: int, folder: Path, hidden: int) -> EditMemory:
    """A memory of `n_edits` random edits of `arch`'s shape, saved to `folder`."""
    text_rows, visual_rows = ROWS[arch]
    memory = EditMemory(hidden, text_layer=0, visual_layer=1, model_type=MODEL_TYPES[arch],
                        text_keys="text")
    g = torch.Generator().manual_seed(common.SEED)
    texts = [torch.randn(text_rows, hidden, generator=g) for _ in range(n_edits)]
    visuals = [torch.randn(visual_rows, hidden, generator=g) for _ in range(n_edits)]
    keys = [{part: torch.randn(part_width(part) * hidden, generator=g) for part in KEY_PARTS}
            for _ in range(n_edits)]
    memory.add_many(texts, visuals, keys, prompts=[f"q{i}" for i in range(n_edits)])
    memory.save(folder)
    return memory


def measure(arch: str, n_edits: int, args, root: Path) -> dict[str, Any]:
    folder = root / f"{arch}-{n_edits}"
    stored = saved_memory(arch, n_edits, folder, args.hidden)
    queries = torch.randn(QUERIES, stored.key_matrix("prompt_end").shape[1])
    picks = torch.randperm(n_edits, generator=torch.Generator().manual_seed(1))[:QUERIES]
    loaded: dict[str, EditMemory] = {}

    def load(lazy: bool):
        def run():
            memory = EditMemory.load(folder, lazy=lazy)
            memory.lookup(queries, "prompt_end")
            loaded[str(lazy)] = memory
        return run

    def states(lazy: bool):
        return lambda: loaded[str(lazy)].states(picks)

    def reload(lazy: bool):
        return lambda: loaded.__setitem__(str(lazy), EditMemory.load(folder, lazy=lazy))

    variants = [Variant("load_whole", load(False)), Variant("load_mapped", load(True)),
                Variant("first_states_whole", states(False), before=reload(False)),
                Variant("first_states_mapped", states(True), before=reload(True))]
    times = common.time_interleaved(variants, args.repeats, args.warmup, torch.device("cpu"))
    # The mapped memory serves what the whole one does.
    whole, mapped = EditMemory.load(folder, lazy=False), EditMemory.load(folder, lazy=True)
    a, b = whole.states(picks), mapped.states(picks)
    same = bool(torch.equal(a.text, b.text) and torch.equal(a.visual, b.visual))
    nbytes = (folder / "memory.safetensors").stat().st_size
    return {
        "edits": n_edits,
        "file_mb": round(nbytes / 2**20, 2),
        "times": {name: common.summary(t) for name, t in times.items()},
        "ratios": {"load_mapped_vs_whole": common.ratio(times, "load_mapped", "load_whole"),
                   "first_states_mapped_vs_whole": common.ratio(
                       times, "first_states_mapped", "first_states_whole")},
        "same_states": same,
    }


def main(argv: list[str] | None = None) -> None:
    p = common.parser("memory_load", __doc__.splitlines()[0])
    p.add_argument("--edits", type=int, nargs="+", default=None,
                   help=f"numbers of stored edits (default {' '.join(map(str, EDIT_COUNTS))})")
    p.add_argument("--hidden", type=int, default=HIDDEN, help="width of the states")
    args = p.parse_args(argv)
    common.check_args(args, repeats=3, warmup=1)
    counts = args.edits or (QUICK_EDIT_COUNTS if args.quick else EDIT_COUNTS)
    common.configure_logging()
    info = common.machine_info(args)
    body: dict[str, Any] = {"target": {"ratio_at_most": TARGET_RATIO, "edits": max(counts)},
                            "hidden": args.hidden, "rows": {}, "results": {}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="dualedit-memory-load-") as tmp:
        for arch in common.archs_of(args):
            body["rows"][arch] = dict(zip(("text", "visual"), ROWS[arch], strict=True))
            body["results"][arch] = []
            for n in counts:
                result = measure(arch, n, args, Path(tmp))
                body["results"][arch].append(result)
                t, r = result["times"], result["ratios"]
                rows.append({"arch": arch, "edits": n, "file MB": result["file_mb"],
                             "whole ms": t["load_whole"]["median_ms"],
                             "mapped ms": t["load_mapped"]["median_ms"],
                             "ratio": r["load_mapped_vs_whole"]["ratio"],
                             "1st states whole ms": t["first_states_whole"]["median_ms"],
                             "1st states mapped ms": t["first_states_mapped"]["median_ms"]})
                for path in (Path(tmp) / f"{arch}-{n}").iterdir():
                    path.unlink()
    largest = [r for r in rows if r["edits"] == max(counts)]
    body["target"]["met"] = all(r["ratio"] <= TARGET_RATIO for r in largest)
    print(common.table(rows, list(rows[0])))
    common.finish(args, "memory_load", info, body)


if __name__ == "__main__":
    main()
