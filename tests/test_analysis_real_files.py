"""The analyses on records of the real MMEdit files (E-VQA and E-IC train splits) with a tiny
model: the real questions, captions and image paths go through the same code as the world's.
Only three real COCO images are shipped, so every image path the records name is served by one
of them (a link under a temporary image root); the records themselves are the real ones."""

from __future__ import annotations

import json
import os

import pytest

from dualedit.analysis.attention import run_attention
from dualedit.analysis.gate import run_gate
from dualedit.analysis.inputs import analysis_data
from dualedit.data.mmedit import MMEditDataset, split_path
from dualedit.data.records import IMAGE_FIELDS


def _real_with_stand_in_images(mmedit_root, task, tmp_path, n=4):
    source = mmedit_root / "images" / "val2014"
    coco = sorted(source.glob("*.jpg"))
    if not coco:
        pytest.skip(f"no COCO images under {source}")
    path = split_path(mmedit_root, task, "train")
    records = json.loads(path.read_text(encoding="utf-8"))[:n]
    root = tmp_path / "images"
    for i, record in enumerate(records):
        for field in IMAGE_FIELDS:
            if record.get(field):
                target = root / record[field]
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    os.symlink(coco[i % len(coco)], target)
    return MMEditDataset(path, image_root=root, task=task).select(range(n))


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_attention_and_gate_on_real_records(mmedit_root, task, tiny_vlm, tmp_path):
    dataset = _real_with_stand_in_images(mmedit_root, task, tmp_path)
    data = analysis_data(tiny_vlm.model, tiny_vlm.processor, dataset)
    assert [r.index for r in data.records] == [0, 1, 2, 3]
    attention = run_attention(data, tmp_path / "out", progress=False)
    assert attention["samples"] == 4 and len(attention["per_layer"]) == data.depth
    for row in attention["per_layer"]:
        assert row["text_share"] + row["image_share"] + row["sink_share"] == pytest.approx(1.0)
    gate = run_gate(data, tmp_path / "out", layers=[0], keys=["prompt_end", "prompt_end_image"],
                    progress=False)
    entry = gate["per_layer"]["0"]["prompt_end"]
    assert len(entry["similarity"]["t_gen"]) == 4 and len(entry["similarity"]["t_loc"]) == 4
    assert all(-1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in entry["similarity"]["m_loc"])
