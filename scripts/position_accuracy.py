"""Per target position, how often an edit makes the model predict the right token (single edits,
teacher forcing), with the unedited model beside it: where a multi-token edit stops taking hold.

    python scripts/position_accuracy.py ARCH TASK ADAPTERS [--cache DIR] [--records N]

ARCH llava|blip2, TASK vqa|caption, ADAPTERS a saved adapter folder; the demo cache's world and
model are used (default ~/.cache/dualedit).
"""

from __future__ import annotations

import argparse
import collections
import os
from pathlib import Path

import torch

from dualedit import DualEditor, load_vlm
from dualedit.data.mmedit import load_split
from dualedit.data.prompts import encode, record_samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arch", choices=["llava", "blip2"])
    p.add_argument("task", choices=["vqa", "caption"])
    p.add_argument("adapters", type=Path)
    default_cache = os.environ.get("DUALEDIT_CACHE", Path.home() / ".cache" / "dualedit")
    p.add_argument("--cache", type=Path, default=Path(default_cache))
    p.add_argument("--records", type=int, default=24)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, processor = load_vlm(args.cache / "models" / f"{args.arch}-seed0")
    editor = DualEditor.from_pretrained(model, processor, args.adapters)
    records = load_split(args.cache / "world-seed0", args.task, "eval")
    hits, base_hits, total = collections.Counter(), collections.Counter(), collections.Counter()
    for i in range(min(args.records, len(records))):
        sample = record_samples(records[i], args.task)["rel"]
        editor.edit(records.images(sample.image), sample.prompt, sample.target.strip())
        batch = encode([sample], processor, editor.backbone, records.images)
        inputs = (model, batch.input_ids, batch.attention_mask, batch.pixel_values)
        with torch.no_grad():
            with editor.context(batch):
                edited = editor.backbone.forward_logits(*inputs)
            with editor.disabled():
                base = editor.backbone.forward_logits(*inputs)
        positions = batch.target_mask[0].nonzero().squeeze(1)  # [n_target]
        gold = batch.target_ids[0, positions]
        for k, (e, b, g) in enumerate(zip(edited[0, positions].argmax(-1),
                                          base[0, positions].argmax(-1), gold, strict=True)):
            total[k] += 1
            hits[k] += int(e == g)
            base_hits[k] += int(b == g)
        editor.restore()
    print("target position | records | edited model right | unedited model right")
    for k in sorted(total):
        print(f"{k} | {total[k]} | {hits[k] / total[k]:.2f} | {base_hits[k] / total[k]:.2f}")
    editor.detach()


if __name__ == "__main__":
    main()
