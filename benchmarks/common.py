"""What the benchmark scripts share: arguments, models, interleaved timing, tables and JSON.

Every script compares variants measured in one run: after a warm-up of each, the repetitions of
all variants are interleaved (round robin, the starting variant rotating each round) so that a
change of machine load hits every variant alike; a ratio is the ratio of the variants' medians,
and its spread the quartiles of the per-round paired ratios.

Models: the pretrained small VLM of the demo cache when there is one
(`$DUALEDIT_CACHE/models/{arch}-seed0`, default `~/.cache/dualedit`), else a freshly initialised
model of the same size (timing does not depend on the weights); the JSON records which.
`--size real` builds LLaVA-1.5-7B / BLIP2-OPT-2.7B at their real shapes instead (`real_sizes.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dualedit.backbones import Backbone, get_backbone
from dualedit.data.mmedit import MMEditDataset, load_split
from dualedit.demo import default_cache_dir
from dualedit.io import atomic_write_text
from dualedit.version import versions

logger = logging.getLogger("benchmarks")

ARCHS = ("llava", "blip2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED = 0
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark takes; `name` gives the default output file."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--arch", choices=(*ARCHS, "both"), default="both")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per variant")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per variant first")
    p.add_argument("--quick", action="store_true", help="tiny model, few repetitions (smoke test)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared CPU, threads that wait for each other "
        "at every small op cost more than they give; 0 = torch's choice)",
    )
    p.add_argument(
        "--model",
        choices=("auto", "fresh"),
        default="auto",
        help="auto: the demo cache's pretrained model when present; fresh: a new random model",
    )
    p.add_argument(
        "--size",
        choices=("small", "real"),
        default="small",
        help="fresh models: small (the built-in world's) or real (LLaVA-1.5-7B's and "
        "BLIP2-OPT-2.7B's widths and depths, random weights: a GPU run; real_sizes.py)",
    )
    p.add_argument(
        "--decoder-layers",
        type=int,
        default=None,
        help="fresh models only: this many decoder layers instead of the size's (e.g. 32, the "
        "depth of LLaVA-1.5-7B and BLIP2-OPT-2.7B, to see how a ratio depends on depth)",
    )
    return p


def archs_of(args: argparse.Namespace) -> list[str]:
    return list(ARCHS) if args.arch == "both" else [args.arch]


def check_args(args: argparse.Namespace, repeats: int, warmup: int) -> None:
    """Fill the defaults that depend on --quick and check the device (exits with a message)."""
    if args.repeats is None:
        args.repeats = 3 if args.quick else repeats
    if args.warmup is None:
        args.warmup = 1 if args.quick else warmup
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit(
            f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}"
        )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    if args.size == "real":
        if args.decoder_layers is not None or args.quick:
            raise SystemExit("--size real takes neither --decoder-layers nor --quick")
        args.model = "fresh"
    if args.decoder_layers is not None:
        if args.decoder_layers < 6:
            raise SystemExit(f"--decoder-layers must be >= 6, got {args.decoder_layers}")
        args.model = "fresh"
    if args.threads < 0:
        raise SystemExit(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)


# -- machine ----------------------------------------------------------------------------------


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """Versions, CPUs, threads, device and dtype, and the load average at the start."""
    device = torch.device(args.device)
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        **versions(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
        ),
        "dtype": args.dtype,
        "load_average_start": load_average(),
    }
    return info


# -- models -----------------------------------------------------------------------------------


@dataclass
class Setup:
    """A model to benchmark, its processor and backbone, records to take inputs from, and where
    they came from (`source`, recorded in the JSON)."""

    arch: str
    model: torch.nn.Module
    processor: Any
    backbone: Backbone
    eval_split: MMEditDataset
    train_split: MMEditDataset
    adapters: Path | None
    source: dict[str, Any]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_setup(arch: str, args: argparse.Namespace, workdir: Path) -> Setup:
    """The pretrained model of the demo cache (with its world and DualEdit adapters when cached),
    else a fresh model of the default size ("tiny" with --quick) on a small world in `workdir`."""
    from dualedit.evaluate import load_vlm

    dtype = DTYPES[args.dtype]
    cache = default_cache_dir()
    model_dir = cache / "models" / f"{arch}-seed{SEED}"
    world_dir = cache / f"world-seed{SEED}"
    pretrained = (
        args.model == "auto"
        and not args.quick
        and (model_dir / "config.json").is_file()
        and (world_dir / "world.json").is_file()
    )
    if pretrained:
        model, processor = load_vlm(model_dir, dtype=dtype, device=args.device)
        # The demo's trained DualEdit editor (older caches kept it under adapters/).
        run = f"{arch}-vqa-seed{SEED}"
        found = [
            folder / "best"
            for folder in (cache / "trained" / "dualedit" / run, cache / "adapters" / run)
            if (folder / "best" / "adapter_config.json").is_file()
        ]
        adapters = found[0] if found else None
        source = {
            "kind": "pretrained",
            "path": str(model_dir),
            "world": str(world_dir),
            "adapters": None if adapters is None else str(adapters),
        }
    else:
        model, processor, world_dir, size = _fresh_model(arch, args, workdir, dtype)
        adapters = None
        source = {"kind": "fresh", "size": size, "seed": SEED, "world": "small world, seed 0"}
    model.eval()
    counts = sum(p.numel() for p in model.parameters())
    backbone = get_backbone(model)
    source.update(
        parameters=counts,
        decoder_layers=backbone.depth(model),
        hidden_size=backbone.hidden_size(model),
        image_tokens=backbone.num_image_tokens(model),
    )
    logger.info("%s: %s model, %d parameters", arch, source["kind"], counts)
    return Setup(
        arch=arch,
        model=model,
        processor=processor,
        backbone=backbone,
        eval_split=load_split(world_dir, "vqa", "eval"),
        train_split=load_split(world_dir, "vqa", "train"),
        adapters=adapters,
        source=source,
    )


def _fresh_model(
    arch: str, args: argparse.Namespace, workdir: Path, dtype: torch.dtype
) -> tuple[torch.nn.Module, Any, Path, str]:
    from dualedit.small_vlm.configs import build_model, build_processor, resolve_size
    from dualedit.small_vlm.tokenizer import build_world_tokenizer
    from dualedit.world import build_world

    world_dir = workdir / "world"
    if not (world_dir / "world.json").is_file():
        build_world(
            world_dir,
            seed=SEED,
            n_train_vqa=8,
            n_eval_vqa=8,
            n_train_caption=4,
            n_eval_caption=4,
            renderings_per_entity=1,
            heldout_per_entity=1,
            progress=False,
        )
    if args.size == "real":
        from real_sizes import REAL_SIZES, build_real_model, build_real_processor

        tokenizer = build_world_tokenizer(world_dir, arch)
        model = build_real_model(arch, tokenizer, device=args.device, dtype=dtype, seed=SEED)
        return model, build_real_processor(arch, tokenizer), world_dir, REAL_SIZES[arch].name
    size_name = "tiny" if args.quick else "small"
    size = resolve_size(size_name)
    if args.decoder_layers is not None:
        size = dataclasses.replace(size, text_layers=args.decoder_layers)
        size_name = f"{size_name}, {args.decoder_layers} decoder layers"
    tokenizer = build_world_tokenizer(world_dir, arch)
    model = build_model(arch, tokenizer, size, seed=SEED).to(device=args.device, dtype=dtype)
    return model, build_processor(arch, tokenizer, size), world_dir, size_name


def workdir() -> tempfile.TemporaryDirectory:
    """A temporary folder for the small world of fresh models."""
    return tempfile.TemporaryDirectory(prefix="dualedit-bench-")


# -- timing -----------------------------------------------------------------------------------


@dataclass
class Variant:
    """One thing to time: `run()` is timed; `before()` / `after()` run untimed around it
    (attach an editor, forget the edit just stored, ...)."""

    name: str
    run: Callable[[], Any]
    before: Callable[[], Any] | None = None
    after: Callable[[], Any] | None = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    variants: Sequence[Variant], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per run of each variant: `warmup` untimed runs each, then `repeats` rounds in
    which every variant runs once (the first variant of a round rotates)."""
    if len({v.name for v in variants}) != len(variants):
        raise ValueError(f"variant names repeat: {[v.name for v in variants]}")

    def once(variant: Variant) -> float:
        if variant.before is not None:
            variant.before()
        try:
            synchronize(device)
            start = time.perf_counter()
            variant.run()
            synchronize(device)
            return time.perf_counter() - start
        finally:
            if variant.after is not None:
                variant.after()

    for variant in variants:
        for _ in range(warmup):
            once(variant)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(repeats):
        shift = r % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            times[variant.name].append(once(variant))
    return times


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, min and max in milliseconds, and the number of runs."""
    ms = [s * 1000 for s in seconds]
    return {
        "median_ms": round(statistics.median(ms), 4),
        "p25_ms": round(_quantile(ms, 0.25), 4),
        "p75_ms": round(_quantile(ms, 0.75), 4),
        "min_ms": round(min(ms), 4),
        "max_ms": round(max(ms), 4),
        "runs": len(ms),
    }


def ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> dict[str, Any]:
    """median(numerator) / median(denominator), with the median and quartiles of the per-round
    ratios (rounds are interleaved, so a paired ratio cancels load that changes between rounds)."""
    a, b = times[numerator], times[denominator]
    paired = [x / y for x, y in zip(a, b, strict=True)]
    return {
        "numerator": numerator,
        "denominator": denominator,
        "ratio": round(statistics.median(a) / statistics.median(b), 4),
        "paired_median": round(statistics.median(paired), 4),
        "paired_p25": round(_quantile(paired, 0.25), 4),
        "paired_p75": round(_quantile(paired, 0.75), 4),
    }


# -- output -----------------------------------------------------------------------------------


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain fixed-width text table of `rows` (dicts) over `columns`."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Sorted, indented JSON, written atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def finish(args: argparse.Namespace, benchmark: str, info: dict[str, Any], body: dict) -> Path:
    """Add the end load average and the arguments, write the JSON, say where."""
    info["load_average_end"] = load_average()
    data = {
        "benchmark": benchmark,
        "machine": info,
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "quick": args.quick,
            "model": args.model,
            "decoder_layers": args.decoder_layers,
            "size": args.size,
            "interleaved": True,
        },
        **body,
    }
    path = write_json(args.out, data)
    print(f"\nwrote {path}")
    return path


def configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
