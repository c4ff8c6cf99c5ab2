"""Applying an edit vs one full forward of the base model on the same input.

`DualEditor.edit(image, prompt, target)` stores an edit after one frozen forward that stops after
decoder layer max(t, v) (no gradient step). It is compared with one full forward of the bare base
model (editor detached) on the same edit sample, image + prompt + " " + target:

- edit: `editor.edit(...)` end to end (processor encoding, the stopped forward, storing);
- full_forward: the full forward on the already processor-encoded sample;
- encode_full_forward: processor encoding + the full forward (the same pipeline as `edit`);
- capture_forward: the model part of `edit` alone (the forward stopped after layer max(t, v)) on
  the encoded sample.

Ratios: edit / full_forward (the issue's target, <= 0.8; it charges the encoding to the edit
only), edit / encode_full_forward (both from raw inputs) and capture_forward / full_forward
(models alone). Batched: `edit_many` of B edits vs one batched full forward of the same B samples.

Usage: python benchmarks/apply_edit.py [--arch llava|blip2|both] [--out FILE] [--repeats N]
       [--quick] [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Variant  # noqa: E402

from dualedit.data.prompts import encode, record_samples  # noqa: E402
from dualedit.editors.dualedit import DualEditor  # noqa: E402
from dualedit.editors.capture import LayerTrace  # noqa: E402

TARGET_RATIO = 0.8
BATCH_SIZES = (4, 16)
QUICK_BATCH_SIZES = (2,)


def bench_arch(setup: common.Setup, args: Any) -> dict[str, Any]:
    model, processor, backbone = setup.model, setup.processor, setup.backbone
    sizes = QUICK_BATCH_SIZES if args.quick else BATCH_SIZES
    editor = DualEditor(
        model,
        processor,
        backbone,
        batch_size=max(sizes),
        pretrained=None if setup.adapters is None else str(setup.adapters),
    )
    t, v = editor.config.text_layer, editor.config.visual_layer
    store = setup.eval_split.images
    records = setup.eval_split
    samples = [record_samples(records[i % len(records)], "vqa")["rel"] for i in range(max(sizes))]
    images = [store(s.image) for s in samples]
    prompts = [s.prompt for s in samples]
    targets = [s.target.strip() for s in samples]
    device = setup.device

    def encoded(n: int) -> Any:
        return encode(samples[:n], processor, backbone, store).to(device)

    @torch.no_grad()
    def full_forward(batch: Any) -> torch.Tensor:
        return backbone.forward_logits(
            model, batch.input_ids, batch.attention_mask, batch.pixel_values
        )

    @torch.no_grad()
    def capture_forward(batch: Any) -> dict[int, torch.Tensor]:
        with LayerTrace(model, backbone, [t, v], stop=True) as capture:
            return capture.run(functools.partial(full_forward, batch))

    def bare(name: str, run: Any) -> Variant:
        # The base model alone: the editor's hooks are off the model while it runs.
        return Variant(name, run, before=editor.detach, after=editor.attach)

    groups = {}
    one = encoded(1)
    groups["single"] = [
        Variant(
            "edit",
            lambda: editor.edit(images[0], prompts[0], targets[0]),
            after=editor.restore,
        ),
        bare("full_forward", lambda: full_forward(one)),
        bare("encode_full_forward", lambda: full_forward(encoded(1))),
        bare("capture_forward", lambda: capture_forward(one)),
    ]
    batches = {n: encoded(n) for n in sizes}
    for n in sizes:
        groups[f"batch_{n}"] = [
            Variant(
                f"edit_many[{n}]",
                lambda n=n: editor.edit_many(images[:n], prompts[:n], targets[:n]),
                after=editor.restore,
            ),
            bare(f"full_forward[{n}]", lambda n=n: full_forward(batches[n])),
            bare(f"encode_full_forward[{n}]", lambda n=n: full_forward(encoded(n))),
        ]
    times = {
        name: common.time_interleaved(variants, args.repeats, args.warmup, device)
        for name, variants in groups.items()
    }
    editor.detach()
    single = times["single"]
    result: dict[str, Any] = {
        "source": setup.source,
        "layers": {
            "text": t,
            "visual": v,
            "stops_after": max(t, v),
            "depth": backbone.depth(model),
        },
        "sequence_length": int(one.input_ids.shape[1]),
        "single": {
            "times": {name: common.summary(s) for name, s in single.items()},
            "ratios": {
                "edit_vs_full_forward": common.ratio(single, "edit", "full_forward"),
                "edit_vs_encode_full_forward": common.ratio(
                    single, "edit", "encode_full_forward"
                ),
                "capture_vs_full_forward": common.ratio(single, "capture_forward", "full_forward"),
            },
        },
        "batched": [],
    }
    for n in sizes:
        group = times[f"batch_{n}"]
        result["batched"].append(
            {
                "batch_size": n,
                "times": {name: common.summary(s) for name, s in group.items()},
                "ratios": {
                    "edit_many_vs_full_forward": common.ratio(
                        group, f"edit_many[{n}]", f"full_forward[{n}]"
                    ),
                    "edit_many_vs_encode_full_forward": common.ratio(
                        group, f"edit_many[{n}]", f"encode_full_forward[{n}]"
                    ),
                },
            }
        )
    achieved = result["single"]["ratios"]["edit_vs_full_forward"]["ratio"]
    result["target"] = {
        "ratio": "edit_vs_full_forward",
        "max": TARGET_RATIO,
        "value": achieved,
        "met": achieved <= TARGET_RATIO,
    }
    return result


def print_arch(arch: str, result: dict[str, Any]) -> None:
    layers = result["layers"]
    print(
        f"\n{arch} ({result['source']['kind']} model, {layers['depth']} decoder layers, "
        f"edit stops after layer {layers['stops_after']}, {result['sequence_length']} tokens)"
    )
    rows = [{"variant": k, **v} for k, v in result["single"]["times"].items()]
    for entry in result["batched"]:
        rows += [{"variant": k, **v} for k, v in entry["times"].items()]
    print(common.table(rows, ["variant", "median_ms", "p25_ms", "p75_ms", "runs"]))
    ratios = [{"name": k, **v} for k, v in result["single"]["ratios"].items()]
    for entry in result["batched"]:
        ratios += [
            {"name": f"{k} (B={entry['batch_size']})", **v} for k, v in entry["ratios"].items()
        ]
    print(common.table(ratios, ["name", "ratio", "paired_median", "paired_p25", "paired_p75"]))
    target = result["target"]
    verdict = "met" if target["met"] else "NOT met"
    print(f"target {target['ratio']} <= {target['max']}: {target['value']:.3f} ({verdict})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parser("apply_edit", __doc__.splitlines()[0]).parse_args(argv)
    common.check_args(args, repeats=20, warmup=3)
    info = common.machine_info(args)
    results = {}
    with common.workdir() as tmp:
        for arch in common.archs_of(args):
            setup = common.load_setup(arch, args, Path(tmp))
            results[arch] = bench_arch(setup, args)
            print_arch(arch, results[arch])
    body = {"results": results, "target_ratio_max": TARGET_RATIO}
    common.finish(args, "apply_edit", info, body)
    return body


if __name__ == "__main__":
    common.configure_logging()
    main()
