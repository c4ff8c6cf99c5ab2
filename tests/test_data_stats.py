"""dataset_stats / format_stats on a small folder made here and on the real files."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dualedit.data.mmedit import SPLIT_FILES
from dualedit.data.records import MMEDIT_FIELDS, RecordError
from dualedit.data.stats import dataset_stats, format_stats


def make_world(tmp_path, with_missing=True):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "a.png")
    for n, relpath in enumerate(SPLIT_FILES.values()):
        records = []
        for i in range(n + 1):
            record = {name: f"{name} {i}" for name in MMEDIT_FIELDS}
            record.update(
                image="a.png", image_rephrase="a.png", m_loc="b.png" if with_missing else "a.png"
            )
            records.append(record)
        path = tmp_path / relpath
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(records))
    return tmp_path


def test_stats_counts_records_and_images(tmp_path):
    rows = dataset_stats(make_world(tmp_path))
    assert [row["records"] for row in rows] == [1, 2, 3, 4]
    assert [row["checked"] for row in rows] == [1, 2, 3, 4]
    assert [(row["task"], row["split"]) for row in rows] == list(SPLIT_FILES)
    assert all(
        (row["images"], row["images_found"], row["images_missing"]) == (2, 1, 1) for row in rows
    )
    table = format_stats(rows)
    lines = table.splitlines()
    assert len(lines) == 6 and lines[0].split()[:3] == ["file", "task", "split"]
    assert lines[2].split() == ["vqa/vqa_train.json", "vqa", "train", "1", "1", "2", "1", "1"]


def test_stats_require_images_and_bad_records(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vqa_train.json: record 0, field 'm_loc'.*b.png"):
        dataset_stats(make_world(tmp_path), require_images=True)
    path = tmp_path / "caption" / "caption_eval_edit.json"
    records = json.loads(path.read_text())
    records[2]["alt"] = 5
    path.write_text(json.dumps(records))
    with pytest.raises(RecordError, match=r"caption_eval_edit.json: record 2, field 'alt'"):
        dataset_stats(tmp_path)


def test_stats_all_images_present(tmp_path):
    rows = dataset_stats(make_world(tmp_path, with_missing=False), require_images=True)
    assert all(row["images_missing"] == 0 and row["images_found"] == 1 for row in rows)


def test_stats_real_files(mmedit_root):
    rows = dataset_stats(mmedit_root)
    assert [row["records"] for row in rows] == [6345, 2093, 2849, 1000]
    assert sum(row["images_found"] for row in rows) == 1  # only record 94's image is referenced
    assert all(row["images_missing"] > 0 for row in rows)
