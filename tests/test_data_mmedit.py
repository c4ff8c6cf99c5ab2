"""MMEditDataset on the real MMEdit files and on small folders made here; lazy images."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dualedit.data.mmedit import ImageStore, MMEditDataset, load_split, split_path
from dualedit.data.prompts import prompt_protocol
from dualedit.data.records import MMEDIT_FIELDS

COUNTS = {
    ("vqa", "train"): 6345,
    ("vqa", "eval"): 2093,
    ("caption", "train"): 2849,
    ("caption", "eval"): 1000,
}
T_LOC_0 = (
    "nq question: mexican leader who was supported by the united states during mexican civil war?"
)


@pytest.mark.parametrize("task, split", sorted(COUNTS))
def test_real_counts(mmedit_root, task, split):
    dataset = load_split(mmedit_root, task, split)
    assert len(dataset) == COUNTS[task, split]
    assert dataset.task == task and dataset.images.root == mmedit_root / "images"
    assert [r.index for r in dataset[:3]] == [0, 1, 2] and dataset[-1].index == len(dataset) - 1


def test_real_first_records_follow_the_protocol(mmedit_root):
    vqa = load_split(mmedit_root, "vqa", "train").samples(
        load_split(mmedit_root, "vqa", "train")[0]
    )
    assert (vqa["rel"].prompt, vqa["rel"].target) == (
        "How many skyscrapers are there? The answer is:",
        " 2",
    )
    assert vqa["rel"].image == "val2014/COCO_val2014_000000262197.jpg"
    assert (
        vqa["t_gen"].prompt
        == "What is the number of high-rise buildings in the city? The answer is:"
    )
    assert vqa["v_gen"].image == "val2014_image_rephrase/262197000_COCO_val2014_000000262197.png"
    assert vqa["v_gen"].prompt == vqa["rel"].prompt
    assert (vqa["t_loc"].image, vqa["t_loc"].prompt, vqa["t_loc"].target) == (
        None,
        T_LOC_0,
        " Benito Juárez",
    )
    assert vqa["m_loc"].prompt == "What sport can you use this for? The answer is:"
    assert (vqa["m_loc"].image, vqa["m_loc"].target) == (
        "val2014/COCO_val2014_000000297147.jpg",
        " motocross",
    )
    assert set(vqa) == {"rel", "t_gen", "v_gen", "t_loc", "m_loc"}

    caption_ds = load_split(mmedit_root, "caption", "train")
    cap = caption_ds.samples(caption_ds[0])
    assert (cap["rel"].prompt, cap["rel"].target) == (
        "a photo of",
        " A selection of wooden kitchen tools on a counter.",
    )
    assert cap["t_gen"].prompt == "provide a brief overview of the image content,"
    assert cap["t_loc"].prompt == T_LOC_0
    assert cap["m_loc"].prompt == "What sport can you use this for? The answer is:"

    eval_ds = load_split(mmedit_root, "vqa", "eval")
    assert (
        eval_ds.samples(eval_ds[0])["rel"].prompt
        == "How many tennis balls are in the picture? The answer is:"
    )
    cap_eval = load_split(mmedit_root, "caption", "eval")
    assert cap_eval.samples(cap_eval[0])["t_gen"].prompt == "a photograph of"


def test_real_image_of_record_94_loads(mmedit_root):
    # The folder's README says record 94's image is ..._000000000285.jpg; the file itself says
    # ..._000000526675.jpg (also present); no record refers to 285.
    dataset = load_split(mmedit_root, "vqa", "train")
    record = dataset[94]
    assert record.image == "val2014/COCO_val2014_000000526675.jpg"
    image = dataset.image(record)
    assert image.mode == "RGB" and image.size == (426, 640)
    assert dataset.images.exists(record.image)
    assert ImageStore(mmedit_root / "images")("val2014/COCO_val2014_000000000285.jpg").mode == "RGB"


def test_real_missing_image_names_file_index_field(mmedit_root):
    dataset = load_split(mmedit_root, "caption", "eval")
    with pytest.raises(FileNotFoundError) as info:
        dataset.image(dataset[5], "image_rephrase")
    message = str(info.value)
    assert "caption_eval_edit.json" in message and "record 5" in message
    assert "'image_rephrase'" in message and dataset[5].image_rephrase in message


def test_real_alt_whitespace_policy(mmedit_root):
    keep = load_split(mmedit_root, "caption", "train", alt_policy="keep")
    strip = load_split(mmedit_root, "caption", "train")
    assert sum(r.alt != r.alt.strip() for r in keep) == 413
    assert sum(r.alt != r.alt.strip() for r in strip) == 0
    keep_eval = load_split(mmedit_root, "caption", "eval", alt_policy="keep")
    assert sum(r.alt != r.alt.rstrip() for r in keep_eval) == 144
    index = next(r.index for r in keep if r.alt.endswith("\n"))
    assert strip[index].alt == keep[index].alt.strip()
    assert strip.samples(strip[index])["rel"].target == " " + keep[index].alt.strip()
    assert keep.samples(keep[index])["rel"].target.endswith("\n")
    assert strip.protocol["alt_policy"] == "strip" and keep.protocol["alt_policy"] == "keep"
    assert keep.protocol == prompt_protocol("keep")


def make_folder(tmp_path, n=3):
    """A world-like folder: vqa/vqa_train.json with n records, images/edit/{i}.png for even i."""
    (tmp_path / "vqa").mkdir()
    (tmp_path / "images" / "edit").mkdir(parents=True)
    records = []
    for i in range(n):
        record = {name: f"{name} {i}" for name in MMEDIT_FIELDS}
        record.update(image=f"edit/{i}.png", image_rephrase=f"edit/{i}.png", m_loc="edit/0.png")
        records.append(record)
        if i % 2 == 0:
            Image.new("L", (8, 6), 40 * i).save(tmp_path / "images" / "edit" / f"{i}.png")
    (tmp_path / "vqa" / "vqa_train.json").write_text(json.dumps(records))
    return tmp_path


def test_default_image_root_and_lazy_rgb_images(tmp_path):
    root = make_folder(tmp_path)
    dataset = MMEditDataset(root / "vqa" / "vqa_train.json")
    assert dataset.images.root == (root / "images").resolve()
    image = dataset.image(dataset[2])
    assert image.mode == "RGB" and image.size == (8, 6) and image.getpixel((0, 0)) == (80, 80, 80)
    with pytest.raises(FileNotFoundError, match=r"record 1, field 'image'"):
        dataset.image(dataset[1])
    with pytest.raises(ValueError, match="not an image field"):
        dataset.image(dataset[0], "src")
    with pytest.raises(ValueError, match="has no field 'hard_m_loc'"):
        dataset.image(dataset[0], "hard_m_loc")
    other = MMEditDataset(root / "vqa" / "vqa_train.json", image_root=root / "elsewhere")
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        other.image(other[0])


def test_image_store_lru_cache(tmp_path):
    root = make_folder(tmp_path, n=5)
    store = ImageStore(root / "images", cache_size=2)
    first = store("edit/0.png")
    assert store("edit/0.png") is first  # cached
    store("edit/2.png")
    store("edit/4.png")  # evicts edit/0.png, the least recently used
    assert store("edit/0.png") is not first
    assert store("edit/4.png") is store("edit/4.png")
    uncached = ImageStore(root / "images", cache_size=0)
    assert uncached("edit/0.png") is not uncached("edit/0.png")
    with pytest.raises(ValueError):
        ImageStore(root, cache_size=-1)


def test_split_path_and_unknown_split(tmp_path):
    assert (
        split_path(tmp_path, "caption", "eval") == tmp_path / "caption" / "caption_eval_edit.json"
    )
    with pytest.raises(ValueError, match="unknown task/split"):
        split_path(tmp_path, "vqa", "test")
    with pytest.raises(FileNotFoundError):
        load_split(tmp_path, "vqa", "eval")
