"""dataset_stats / format_stats on a small folder made here and on the real files."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dualedit.data.mmedit import SPLIT_FILES
from dualedit.data.records import MMEDIT_FIELDS, RecordError
from dualedit.cli import main
from dualedit.data.mmedit import ImageStore, load_split
from dualedit.data.stats import ImageProblems, dataset_stats, format_stats


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
    with pytest.raises(ImageProblems, match=r"vqa_train.json: record 0, field 'm_loc'.*b.png"):
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


def test_every_bad_image_is_reported_with_its_record_and_path(tmp_path, capsys):
    root = make_world(tmp_path, with_missing=False)
    images = root / "images"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(images / "whole.png")
    data = (images / "whole.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    (images / "text.png").write_text("not an image")
    (tmp_path / "outside.png").write_bytes(data)
    path = root / "vqa" / "vqa_eval.json"
    records = json.loads(path.read_text())
    records[0].update(image="truncated.png", image_rephrase="text.png", m_loc="../outside.png")
    records[1].update(image="whole.png", m_loc=str(tmp_path / "outside.png"))
    path.write_text(json.dumps(records))
    with pytest.raises(ImageProblems) as raised:
        dataset_stats(root, require_images=True)
    problems = raised.value.problems
    assert len(problems) == 4, problems
    assert "record 0, field 'image': image 'truncated.png'" in problems[0]
    assert "not a readable image" in problems[0]
    assert "record 0, field 'image_rephrase': image 'text.png'" in problems[1]
    assert "record 0, field 'm_loc': image path '../outside.png' leaves the image root" in problems[2]
    assert "record 1, field 'm_loc'" in problems[3] and "leaves the image root" in problems[3]
    # The records stay usable: the good image loads, the bad ones fail naming record and path.
    dataset = load_split(root, "vqa", "eval")
    assert dataset.image(dataset[1], "image").size == (64, 64)
    with pytest.raises(ValueError, match=r"record 0, field 'image'.*truncated.png.*not a readable"):
        dataset.image(dataset[0], "image")
    with pytest.raises(ValueError, match="leaves the image root"):
        ImageStore(images).load("../outside.png")
    # Without --require-images the counts still come; with it, the CLI lists them and exits 2.
    assert main(["data", "stats", str(root)]) == 0
    capsys.readouterr()
    assert main(["data", "stats", str(root), "--require-images"]) == 2
    err = capsys.readouterr().err
    assert "4 bad image reference(s)" in err and "truncated.png" in err and "Traceback" not in err
