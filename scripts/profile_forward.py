"""Where the editor's per-forward cost goes: aten ops, kernel launches and device syncs per
forward, the bare model (no editor hooks) vs the model with one stored edit (LLaVA, batch of 8
unrelated inputs, so the gate closes). Run from the repository root:

    python scripts/profile_forward.py   # CUDA when present, else the CPU
"""

from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402
import inference  # noqa: E402

from dualedit.data.prompts import encode, record_samples  # noqa: E402

FORWARDS = 10


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = common.parser("profile", "profile").parse_args(["--device", device, "--arch", "llava"])
    common.check_args(args, repeats=1, warmup=1)
    setup = common.load_setup("llava", args, Path(tempfile.mkdtemp()))
    model, processor, backbone = setup.model, setup.processor, setup.backbone
    store, records = setup.eval_split.images, setup.eval_split
    edit = record_samples(records[0], "vqa")["rel"]
    samples = [record_samples(records[i], "vqa")["m_loc"] for i in range(8)]
    editor, _ = inference.filled_editor(setup, 1, store(edit.image), edit.prompt, edit.target.strip())
    batch = encode(samples, processor, backbone, store).to(device)
    inputs = (model, batch.input_ids, batch.attention_mask, batch.pixel_values)

    def bare() -> None:
        with torch.no_grad():
            backbone.forward_logits(*inputs)

    def edited() -> None:
        with torch.no_grad(), editor.context(batch):
            backbone.forward_logits(*inputs)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for name, fn, attached in (("bare", bare, False), ("edited", edited, True)):
        if attached:
            editor.attach()
        for _ in range(5):
            fn()
        common.synchronize(torch.device(device))
        with profile(activities=activities) as prof:
            for _ in range(FORWARDS):
                fn()
            common.synchronize(torch.device(device))
        if attached:
            editor.detach()
        events = prof.key_averages()
        counts = collections.Counter()
        for e in events:
            counts[e.key] += e.count
        aten = sum(c for k, c in counts.items() if k.startswith("aten::")) / FORWARDS
        launches = counts.get("cudaLaunchKernel", 0) / FORWARDS
        syncs = {k: c / FORWARDS for k, c in counts.items()
                 if "ynchronize" in k or "Memcpy" in k or k == "aten::item"}
        print(f"== {name}: per forward {aten:.0f} aten ops, {launches:.0f} kernel launches, "
              f"syncs and copies {syncs}")
        print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50))


if __name__ == "__main__":
    main()
