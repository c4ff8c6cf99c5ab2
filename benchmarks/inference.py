"""Inference with the DualEdit editor attached vs the bare base model.

Two workloads on a batch of eval prompts: a teacher-forced forward (prompt + target, as the
harness scores) and greedy generate() of a few new tokens (exactly that many: min = max). Each
runs on the bare model (no editor hooks on it) and with an editor holding 1, 100 and 10,000 edits,
for two kinds of input:

- related: the stored edit's own sample (image, prompt) in every row, so the gate opens and both
  adapters run;
- unrelated: other records' M-Loc samples (another image and question), where the gate should
  stay closed (the JSON records the fraction of inputs whose gate opened).

Filling the memory: one real edit is stored with `editor.edit`; the others are added with
`memory.add`, reusing that edit's states (the same tensors, so the memory costs no RAM per copy)
with their own random gate keys, so the nearest-edit lookup compares each input with N distinct
keys as it would with N real edits. Target: ratio <= 1.10 at one edit.

Usage: python benchmarks/inference.py [--arch llava|blip2|both] [--out FILE] [--repeats N]
       [--quick] [--device cuda] [--dtype bfloat16] [--gate-key learned]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Variant  # noqa: E402

from dualedit.data.prompts import encode, encode_prompts, record_samples  # noqa: E402
from dualedit.editors.dualedit import DualEditor  # noqa: E402
from dualedit.editors.dualedit.gate import KEY_PARTS, LEARNED, part_width  # noqa: E402
from dualedit.editors.dualedit.heads import GateHeads  # noqa: E402

TARGET_RATIO = 1.10
EDIT_COUNTS = (1, 100, 10_000)
QUICK_EDIT_COUNTS = (1, 10)
BATCH = 8
QUICK_BATCH = 2
NEW_TOKENS = 4
QUICK_NEW_TOKENS = 2


def filled_editor(setup: common.Setup, n_edits: int, image: Any, prompt: str, target: str,
                  gate_key: str | None = None):
    """A detached editor holding one real edit and n_edits - 1 copies with random gate keys
    (`gate_key`: the gate key kind, None: the adapters'; "learned" without fitted heads in the
    adapters' folder gets untrained heads, which cost the same time)."""
    editor = DualEditor(
        setup.model,
        setup.processor,
        setup.backbone,
        pretrained=None if setup.adapters is None else str(setup.adapters),
        **({} if gate_key is None else {"gate_key": gate_key}),
    )
    if editor.config.gate_key == LEARNED and editor.memory.gate_heads is None:
        editor.memory.set_gate_heads(GateHeads(setup.backbone.hidden_size(setup.model)))
    real = editor.edit(image, prompt, target)
    states = editor.memory.states([0])
    text = states.text[0][states.text_mask[0]]  # [m, hidden]
    visual = states.visual[0][states.visual_mask[0]]  # [m, hidden]
    generator = torch.Generator().manual_seed(common.SEED)
    hidden = text.shape[-1]
    keys = {
        k: torch.randn(n_edits - 1, hidden * part_width(k), generator=generator)
        for k in KEY_PARTS
    }
    for i in range(n_edits - 1):
        editor.memory.add(text, visual, {k: keys[k][i].to(text.device) for k in KEY_PARTS})
    editor.detach()
    return editor, real


def bench_arch(setup: common.Setup, args: Any) -> dict[str, Any]:
    model, processor, backbone = setup.model, setup.processor, setup.backbone
    counts = QUICK_EDIT_COUNTS if args.quick else EDIT_COUNTS
    batch_size = QUICK_BATCH if args.quick else BATCH
    new_tokens = QUICK_NEW_TOKENS if args.quick else NEW_TOKENS
    store, records = setup.eval_split.images, setup.eval_split
    edit = record_samples(records[0], "vqa")["rel"]
    inputs = {
        "related": [edit] * batch_size,
        "unrelated": [
            record_samples(records[i % len(records)], "vqa")["m_loc"] for i in range(batch_size)
        ],
    }
    editors = {
        n: filled_editor(setup, n, store(edit.image), edit.prompt, edit.target.strip(),
                         args.gate_key)[0]
        for n in counts
    }
    device = setup.device
    gate_open: dict[str, dict[str, float]] = {}

    def forward(batch: Any, editor: DualEditor | None, group: str) -> None:
        with torch.no_grad():
            if editor is None:
                backbone.forward_logits(
                    model, batch.input_ids, batch.attention_mask, batch.pixel_values
                )
                return
            with editor.context(batch) as ctx:
                backbone.forward_logits(
                    model, batch.input_ids, batch.attention_mask, batch.pixel_values
                )
            gate_open[group][f"edits={len(editor.memory)}"] = ctx.open.float().mean().item()

    def generate(batch: Any, editor: DualEditor | None, group: str) -> None:
        kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        with torch.no_grad():
            if editor is None:
                backbone.generate(
                    model, batch.input_ids, batch.attention_mask, batch.pixel_values, **kwargs
                )
                return
            with editor.session(batch.input_ids, batch.attention_mask) as ctx:
                backbone.generate(
                    model, batch.input_ids, batch.attention_mask, batch.pixel_values, **kwargs
                )
            gate_open[group][f"edits={len(editor.memory)}"] = ctx.open.float().mean().item()

    results: dict[str, Any] = {}
    for kind, samples in inputs.items():
        batches = {
            "forward": encode(samples, processor, backbone, store).to(device),
            "generate": encode_prompts(samples, processor, backbone, store).to(device),
        }
        for mode, run in (("forward", forward), ("generate", generate)):
            group = f"{mode}/{kind}"
            gate_open[group] = {}
            batch = batches[mode]
            variants = [Variant("bare", lambda run=run, batch=batch: run(batch, None, group))]
            for n, editor in editors.items():
                variants.append(
                    Variant(
                        f"edits={n}",
                        lambda run=run, batch=batch, editor=editor: run(batch, editor, group),
                        before=editor.attach,
                        after=editor.detach,
                    )
                )
            times = common.time_interleaved(variants, args.repeats, args.warmup, device)
            results[group] = {
                "mode": mode,
                "inputs": kind,
                "batch_size": batch_size,
                "sequence_length": int(batch.input_ids.shape[1]),
                "new_tokens": new_tokens if mode == "generate" else None,
                "times": {name: common.summary(s) for name, s in times.items()},
                "ratios": {f"edits={n}": common.ratio(times, f"edits={n}", "bare") for n in counts},
                "gate_open_fraction": gate_open[group],
            }
    per_edit = editors[counts[0]].memory.entries()[0].nbytes
    targets = {
        group: {
            "value": entry["ratios"][f"edits={counts[0]}"]["ratio"],
            "met": entry["ratios"][f"edits={counts[0]}"]["ratio"] <= TARGET_RATIO,
        }
        for group, entry in results.items()
    }
    return {
        "source": setup.source,
        "edit_counts": list(counts),
        "layers": {"text": editors[counts[0]].config.text_layer,
                   "visual": editors[counts[0]].config.visual_layer},
        "tau": editors[counts[0]].config.tau,
        "gate_key": editors[counts[0]].config.gate_key,
        "bytes_per_edit": per_edit,
        "memory_note": "copies share the real edit's states; only gate keys are distinct",
        "groups": results,
        "target": {"ratio": f"edits={counts[0]} vs bare", "max": TARGET_RATIO, "groups": targets},
    }


def print_arch(arch: str, result: dict[str, Any]) -> None:
    print(f"\n{arch} ({result['source']['kind']} model, tau {result['tau']})")
    rows = []
    for group, entry in result["groups"].items():
        for name in ["bare", *entry["ratios"]]:
            ratio = entry["ratios"].get(name, {})
            rows.append(
                {
                    "workload": group,
                    "variant": name,
                    "median_ms": entry["times"][name]["median_ms"],
                    "p25_ms": entry["times"][name]["p25_ms"],
                    "p75_ms": entry["times"][name]["p75_ms"],
                    "vs_bare": ratio.get("ratio", 1.0 if name == "bare" else None),
                    "paired_median": ratio.get("paired_median"),
                    "paired_p25": ratio.get("paired_p25"),
                    "paired_p75": ratio.get("paired_p75"),
                    "gate_open": entry["gate_open_fraction"].get(name),
                }
            )
    print(
        common.table(
            rows,
            ["workload", "variant", "median_ms", "p25_ms", "p75_ms", "vs_bare", "paired_median",
             "paired_p25", "paired_p75", "gate_open"],
        )
    )
    for group, target in result["target"]["groups"].items():
        verdict = "met" if target["met"] else "NOT met"
        print(f"target {group} {result['target']['ratio']} <= {result['target']['max']}: "
              f"{target['value']:.3f} ({verdict})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser("inference", __doc__.splitlines()[0])
    p.add_argument("--gate-key", default=None,
                   help="the gate key kind (default: the adapters'); e.g. learned, whose "
                        "[n, 128] key matrix is a fifth of prompt_end_image_groups' on 128 wide "
                        "states")
    args = p.parse_args(argv)
    common.check_args(args, repeats=15, warmup=2)
    info = common.machine_info(args)
    results = {}
    with common.workdir() as tmp:
        for arch in common.archs_of(args):
            setup = common.load_setup(arch, args, Path(tmp))
            results[arch] = bench_arch(setup, args)
            print_arch(arch, results[arch])
    body = {"results": results, "target_ratio_max": TARGET_RATIO}
    common.finish(args, "inference", info, body)
    return body


if __name__ == "__main__":
    common.configure_logging()
    main()
