"""MMEdit-format edit files (E-VQA, E-IC): one loader for the real files and the built-in world's.

A dataset folder holds `vqa/vqa_{train,eval}.json`, `caption/caption_{train,eval}_edit.json` and
one image root, `images/`, that every record path is relative to. Records are validated when a
file is loaded; images are opened only when asked for, with a small LRU cache.
"""

from __future__ import annotations

import copy

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

from PIL import Image

from dualedit.data.prompts import Sample, prompt_protocol, record_samples
from dualedit.data.records import ALT_POLICIES, IMAGE_FIELDS, EditRecord, parse_record

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "eval")
# (task, split) -> path relative to the dataset folder.
SPLIT_FILES: dict[tuple[str, str], str] = {
    ("vqa", "train"): "vqa/vqa_train.json",
    ("vqa", "eval"): "vqa/vqa_eval.json",
    ("caption", "train"): "caption/caption_train_edit.json",
    ("caption", "eval"): "caption/caption_eval_edit.json",
}
IMAGE_DIR = "images"


class ImageStore:
    """Opens images under one root on demand, as RGB, keeping the last few in an LRU cache.

    Callable: `store(path)` is `store.load(path)`, so a store can be passed as `load_image`.

    Example:
        >>> store = ImageStore("data/mmedit/images")
        >>> store("val2014/COCO_val2014_000000526675.jpg").size
        (640, 480)
    """

    def __init__(self, root: str | Path, cache_size: int = 64):
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.root = Path(root)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Image.Image] = OrderedDict()

    def __repr__(self) -> str:
        return f"ImageStore({str(self.root)!r}, cache_size={self.cache_size})"

    def path(self, relpath: str, *, where: str = "") -> Path:
        """The file a record path points to.

        Raises:
            ValueError: an absolute path, or one whose `..` parts leave the image root (checked
                on the path as written, so a symlinked folder inside the root is fine).
        """
        normal = os.path.normpath(relpath)
        if os.path.isabs(relpath) or normal == ".." or normal.startswith(".." + os.sep):
            prefix = f"{where}: " if where else ""
            raise ValueError(
                f"{prefix}image path {relpath!r} leaves the image root {self.root}; record "
                "paths are relative to it"
            )
        return self.root / relpath

    def exists(self, relpath: str) -> bool:
        return self.path(relpath).is_file()

    def check(self, relpath: str) -> str | None:
        """Why the image at `relpath` is unusable (outside the root, missing, not an image,
        truncated), or None when it decodes whole."""
        try:
            self._decode(relpath, "")
        except (ValueError, FileNotFoundError) as error:
            return str(error)
        return None

    def load(self, relpath: str, *, where: str = "") -> Image.Image:
        """The image at `relpath` as RGB (shared with the cache: do not modify it in place).

        Args:
            relpath: path relative to the root.
            where: who asked (file, record, field), prepended to the error message.

        Raises:
            FileNotFoundError: no such file under the root.
            ValueError: a path that leaves the root, or a file that is not a whole image (not
                an image at all, truncated); the message names `where` and the path.
        """
        image = self._cache.get(relpath)
        if image is not None:
            self._cache.move_to_end(relpath)
            return image
        image = self._decode(relpath, where)
        if self.cache_size:
            self._cache[relpath] = image
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return image

    def __call__(self, relpath: str) -> Image.Image:
        return self.load(relpath)

    def _decode(self, relpath: str, where: str) -> Image.Image:
        prefix = f"{where}: " if where else ""
        path = self.path(relpath, where=where)
        if not path.is_file():
            raise FileNotFoundError(f"{prefix}image {relpath!r} not found (looked for {path})")
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")  # decodes every pixel; the file is closed on exit
        except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for bad files
            raise ValueError(
                f"{prefix}image {relpath!r} ({path}) is not a readable image: {error}"
            ) from error


def infer_task(path: str | Path) -> str:
    """ "vqa" or "caption" from a file name (vqa_train.json, caption_eval_edit.json)."""
    name = Path(path).name.lower()
    for task in ("vqa", "caption"):
        if name.startswith(task):
            return task
    raise ValueError(
        f"{path}: cannot infer the task from the file name; pass task='vqa' or 'caption'"
    )


def default_image_root(path: str | Path) -> Path:
    """`<folder>/images` where <folder> holds vqa/ and caption/ (the file's grandparent)."""
    return Path(path).resolve().parent.parent / IMAGE_DIR


class MMEditDataset(Sequence[EditRecord]):
    """The validated records of one MMEdit-format file, with lazy access to their images.

    Args:
        path: the JSON file (a list of flat records).
        image_root: root of the record image paths; default `<folder>/images` (see
            `default_image_root`).
        task: "vqa" or "caption"; default inferred from the file name.
        alt_policy: "strip" (default) removes the whitespace around `alt`, "keep" keeps it.
        cache_size: how many opened images to keep.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a JSON list; `RecordError` (a ValueError) for a bad record.

    Example:
        >>> ds = MMEditDataset("data/mmedit/vqa/vqa_eval.json")
        >>> len(ds), ds.task, ds[0].alt
        (2093, 'vqa', '2')
        >>> image = ds.image(ds[0], "image")
    """

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None = None,
        *,
        task: str | None = None,
        alt_policy: str = "strip",
        cache_size: int = 64,
    ):
        if alt_policy not in ALT_POLICIES:
            raise ValueError(f"unknown alt_policy {alt_policy!r}; expected one of {ALT_POLICIES}")
        self.path = Path(path)
        self.task = infer_task(self.path) if task is None else task
        if self.task not in ("vqa", "caption"):
            raise ValueError(
                f"{self.path}: unknown task {self.task!r}; expected 'vqa' or 'caption'"
            )
        self.alt_policy = alt_policy
        root = default_image_root(self.path) if image_root is None else Path(image_root)
        self.images = ImageStore(root, cache_size=cache_size)
        raw = _read_json_list(self.path)
        self._records = tuple(
            parse_record(item, file=str(self.path), index=i, alt_policy=alt_policy)
            for i, item in enumerate(raw)
        )
        logger.debug("loaded %d %s records from %s", len(self._records), self.task, self.path)

    def __repr__(self) -> str:
        return (
            f"MMEditDataset({str(self.path)!r}, task={self.task!r}, records={len(self)}, "
            f"image_root={str(self.images.root)!r}, alt_policy={self.alt_policy!r})"
        )

    def __len__(self) -> int:
        return len(self._records)

    def select(self, indices: Sequence[int]) -> MMEditDataset:
        """The records at `indices` (in that order) as a dataset of their own, sharing the image
        store (e.g. the validation edits of a train split, `train.data.split_indices`)."""
        chosen = copy.copy(self)
        chosen._records = tuple(self._records[i] for i in indices)
        return chosen

    @overload
    def __getitem__(self, index: int) -> EditRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[EditRecord]: ...

    def __getitem__(self, index: int | slice) -> EditRecord | list[EditRecord]:
        if isinstance(index, slice):
            return list(self._records[index])
        return self._records[index]

    def __iter__(self) -> Iterator[EditRecord]:
        return iter(self._records)

    @property
    def protocol(self) -> dict[str, Any]:
        """The prompt protocol with this dataset's alt policy, to record with results."""
        return prompt_protocol(self.alt_policy)

    def samples(self, record: EditRecord) -> dict[str, Sample]:
        """The protocol samples of a record (see `record_samples`)."""
        return record_samples(record, self.task)

    def image(self, record: EditRecord, field: str = "image") -> Image.Image:
        """Open one of a record's images (RGB).

        Raises:
            ValueError: `field` is not an image field, or the record does not have it.
            FileNotFoundError: the file is missing; the message names file, record and field.
        """
        if field not in IMAGE_FIELDS:
            raise ValueError(f"{field!r} is not an image field; expected one of {IMAGE_FIELDS}")
        relpath = getattr(record, field)
        if relpath is None:
            raise ValueError(f"{self.path}: record {record.index} has no field {field!r}")
        return self.images.load(
            relpath, where=f"{self.path}: record {record.index}, field {field!r}"
        )

    def image_refs(self) -> Iterator[tuple[int, str, str]]:
        """Every image reference as (record index, field, relative path)."""
        for record in self._records:
            for field in IMAGE_FIELDS:
                relpath = getattr(record, field)
                if relpath is not None:
                    yield record.index, field, relpath


def split_path(root: str | Path, task: str, split: str) -> Path:
    """The file of a (task, split) in a dataset folder, e.g. <root>/vqa/vqa_train.json."""
    key = (task, split)
    if key not in SPLIT_FILES:
        raise ValueError(
            f"unknown task/split {task!r}/{split!r}; expected task in ('vqa', 'caption') and "
            f"split in {SPLITS}"
        )
    return Path(root) / SPLIT_FILES[key]


def load_split(root: str | Path, task: str, split: str, **options: Any) -> MMEditDataset:
    """Load `<root>/vqa/vqa_{split}.json` or `<root>/caption/caption_{split}_edit.json`.

    Images resolve against `<root>/images` unless `image_root=` is given; other keyword options
    go to `MMEditDataset`.

    Example:
        >>> ds = load_split("data/mmedit", "caption", "eval")
    """
    options.setdefault("image_root", Path(root) / IMAGE_DIR)
    return MMEditDataset(split_path(root, task, split), task=task, **options)


def _read_json_list(path: Path) -> list[Any]:
    if not path.is_file():
        raise FileNotFoundError(f"edit file not found: {path}")
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data
