"""Training data: validation split, seeded data order, sharding, edit batches; and the tiny
MMEdit-format dataset (words of the tiny tokenizer) that the other training tests use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import COLOURS
from PIL import Image

from dualedit.data.mmedit import MMEditDataset
from dualedit.data.prompts import record_samples
from dualedit.train.data import (
    IMAGE_KEYS,
    StepBatches,
    encode_edits_batch,
    shard,
    split_indices,
    step_records,
    steps_per_epoch,
)

SHAPES = ["circle", "square", "triangle", "star"]
ANSWERS = ["dog", "cat", "bird", "car", "tree", "house", "ball", "kite", "boat", "apple", "banana"]


def write_tiny_mmedit(root: Path, n: int = 12) -> MMEditDataset:
    """A small E-VQA train file in MMEdit layout under `root` (vqa/vqa_train.json, images/),
    in the tiny tokenizer's words; records differ in image, question and new answer."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = []
    for colour, rgb in COLOURS.items():
        for k, shape in enumerate(SHAPES):
            image = Image.new("RGB", (32, 32), rgb)
            image.paste((255, 255, 255), (4 + 4 * k, 4, 14 + 4 * k, 14 + 3 * k))
            name = f"{colour}_{shape}.png"
            image.save(images / name)
            names.append((colour, shape, name))
    records = []
    for i in range(n):
        colour, shape, name = names[i % len(names)]
        _, _, rephrase_image = names[(i + 4) % len(names)]
        _, _, loc_image = names[(i + 7) % len(names)]
        records.append(
            {
                "src": f"what is the {shape} on the {colour} picture ?",
                "pred": "person",
                "rephrase": f"which {shape} is in this {colour} image ?",
                "alt": ANSWERS[i % len(ANSWERS)],
                "image": name,
                "image_rephrase": rephrase_image,
                "loc": f"nq question: who was the leader of the {ANSWERS[(i + 3) % 11]} country",
                "loc_ans": "man" if i % 2 else "woman",
                "m_loc": loc_image,
                "m_loc_q": "what color is the sky ?",
                "m_loc_a": "blue",
            }
        )
    path = root / "vqa" / "vqa_train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")
    return MMEditDataset(path)


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory) -> MMEditDataset:
    return write_tiny_mmedit(tmp_path_factory.mktemp("tiny_mmedit"), n=12)


def test_split_is_fixed_disjoint_and_complete():
    train, val = split_indices(20, 5)
    assert len(val) == 5 and len(train) == 15
    assert sorted(train + val) == list(range(20))
    assert split_indices(20, 5) == (train, val)
    assert val != list(range(15, 20))  # a seeded selection, not the file's tail
    with pytest.raises(ValueError, match="1 <= val edits < records; got 20 of 20"):
        split_indices(20, 20)


def test_step_records_seeded_epochs():
    train = list(range(100, 110))
    assert steps_per_epoch(10, 4) == 2
    first = [step_records(train, 4, seed=1, step=s) for s in range(2)]
    # One epoch: disjoint batches of training records, the remainder left out.
    assert len(set(first[0]) | set(first[1])) == 8 and set(first[0]) <= set(train)
    assert step_records(train, 4, seed=1, step=0) == first[0]  # a pure function of (seed, step)
    assert step_records(train, 4, seed=2, step=0) != first[0]
    assert step_records(train, 4, seed=1, step=2) != first[0]  # next epoch, new permutation
    with pytest.raises(ValueError, match="3 training edits are fewer than batch_size 4"):
        step_records([1, 2, 3], 4, seed=0, step=0)


def test_shard_contiguous_shares():
    assert shard([1, 2, 3, 4], 0, 2) == [1, 2]
    assert shard([1, 2, 3, 4], 1, 2) == [3, 4]
    with pytest.raises(ValueError, match="3 items cannot be split evenly over 2"):
        shard([1, 2, 3], 0, 2)


def test_edit_batch_rows_follow_the_protocol(tiny_vlm, tiny_train):
    records = [tiny_train[i] for i in (0, 5, 7)]
    batch = encode_edits_batch(
        records, "vqa", tiny_vlm.processor, tiny_vlm.backbone, tiny_train.images
    )
    n = 3
    assert batch.n == n and batch.records == [0, 5, 7]
    assert batch.images.input_ids.shape[0] == len(IMAGE_KEYS) * n
    assert batch.text.pixel_values is None and batch.text.input_ids.shape[0] == n
    tokenizer = tiny_vlm.processor.tokenizer
    for key in IMAGE_KEYS:
        for i, record in enumerate(records):
            row = batch.rows(key).start + i
            target = batch.images.target_ids[row][batch.images.target_mask[row]]
            expected = record_samples(record, "vqa")[key].target
            assert tokenizer.decode(target).strip() == expected.strip()
    rel_text = tokenizer.decode(batch.images.input_ids[batch.rows("rel").start])
    assert "what is the circle on the red picture" in rel_text


def test_step_batches_serve_each_rank_its_share(tiny_vlm, tiny_train):
    train, _ = split_indices(len(tiny_train), 2)
    common = {
        "batch_size": 4,
        "seed": 3,
        "start": 5,
        "stop": 7,
        "processor": tiny_vlm.processor,
        "backbone": tiny_vlm.backbone,
    }
    alone = StepBatches(tiny_train, train, rank=0, world=1, **common)
    halves = [StepBatches(tiny_train, train, rank=r, world=2, **common) for r in (0, 1)]
    assert len(alone) == 2
    whole = alone[1]
    assert whole.records == step_records(train, 4, 3, 6)
    assert halves[0][1].records + halves[1][1].records == whole.records
    assert torch.equal(
        halves[0][1].text.input_ids,
        whole.text.input_ids[:2, : halves[0][1].text.input_ids.shape[1]],
    )
    with pytest.raises(IndexError):
        alone[2]
