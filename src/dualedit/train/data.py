"""Training data for the adapters: the validation split, the seeded data order, and edit batches.

Every step's batch is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would, and each process of a data-parallel run takes its own contiguous share of
the step's global batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dualedit.backbones import Backbone
from dualedit.data.mmedit import MMEditDataset
from dualedit.data.prompts import EncodedBatch, LoadImage, encode, record_samples
from dualedit.data.records import EditRecord

#: Seed of the train/validation split; fixed so runs with different `seed`s validate alike.
VAL_SPLIT_SEED = 0
#: Rows of `EditBatch.images`, in blocks of n (one row per edit in each block).
IMAGE_KEYS: tuple[str, ...] = ("rel", "t_gen", "v_gen", "m_loc")


def split_indices(n_records: int, n_val: int) -> tuple[list[int], list[int]]:
    """(train, validation) record indices: a fixed seeded selection of `n_val` for validation.

    Raises:
        ValueError: n_val not in [1, n_records - 1].
    """
    if not 1 <= n_val < n_records:
        raise ValueError(
            f"validation needs 1 <= val edits < records; got {n_val} of {n_records} records"
        )
    order = np.random.default_rng(VAL_SPLIT_SEED).permutation(n_records)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Full batches per pass over the training records (the remainder waits for the next pass)."""
    if n_train < batch_size:
        raise ValueError(
            f"{n_train} training edits are fewer than batch_size {batch_size}; lower batch_size "
            "or val_edits"
        )
    return n_train // batch_size


def step_records(train: Sequence[int], batch_size: int, seed: int, step: int) -> list[int]:
    """The record indices of global step `step` (0-based): epoch e = step // steps_per_epoch is a
    permutation of `train` drawn from (seed, e), cut into batches.

    Example:
        >>> step_records(range(10), 4, seed=0, step=3)  # second epoch, first batch
    """
    per_epoch = steps_per_epoch(len(train), batch_size)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(train))
    return [int(train[i]) for i in order[k * batch_size : (k + 1) * batch_size]]


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Process `rank`'s contiguous share of `items` (len(items) must divide by `world`)."""
    if len(items) % world:
        raise ValueError(f"{len(items)} items cannot be split evenly over {world} processes")
    size = len(items) // world
    return list(items[rank * size : (rank + 1) * size])


@dataclass
class EditBatch:
    """The inputs for n edits: one image batch and one text-only batch, teacher-forced.

    Attributes:
        images: rows [rel_0..rel_{n-1}, t_gen_0.., v_gen_0.., m_loc_0..] (see `IMAGE_KEYS`); the
            rel rows are also the edit samples (image, src prompt, alt target).
        text: rows [t_loc_0..t_loc_{n-1}] (no image).
        records: the dataset indices of the n edits.
    """

    images: EncodedBatch
    text: EncodedBatch
    records: list[int]

    @property
    def n(self) -> int:
        return len(self.records)

    def rows(self, key: str) -> slice:
        """The rows of `images` that hold samples of `key` ("rel", "t_gen", "v_gen", "m_loc")."""
        i = IMAGE_KEYS.index(key)
        return slice(i * self.n, (i + 1) * self.n)

    def to(self, device: torch.device | str) -> EditBatch:
        return EditBatch(self.images.to(device), self.text.to(device), list(self.records))


def encode_edits_batch(
    records: Sequence[EditRecord],
    task: str,
    processor: Any,
    backbone: Backbone,
    load_image: LoadImage,
) -> EditBatch:
    """Encode the protocol samples of `records` (see `record_samples`) into an `EditBatch`."""
    if not records:
        raise ValueError("cannot encode an empty list of edits")
    samples = [record_samples(record, task) for record in records]
    image_samples = [s[key] for key in IMAGE_KEYS for s in samples]
    text_samples = [s["t_loc"] for s in samples]
    return EditBatch(
        images=encode(image_samples, processor, backbone, load_image),
        text=encode(text_samples, processor, backbone, load_image),
        records=[record.index for record in records],
    )


class StepBatches(torch.utils.data.Dataset):
    """Item i = this process's `EditBatch` of step `start + i`, for a DataLoader (workers prefetch
    and encode ahead; the content depends on the step only).

    Args:
        dataset: the train split.
        train: the training record indices (validation excluded).
        batch_size: the global batch size; seed: the data-order seed.
        start, stop: the steps to serve, [start, stop).
        rank, world: this process and the number of processes.
        processor, backbone: to encode with.
    """

    def __init__(
        self,
        dataset: MMEditDataset,
        train: Sequence[int],
        *,
        batch_size: int,
        seed: int,
        start: int,
        stop: int,
        rank: int,
        world: int,
        processor: Any,
        backbone: Backbone,
    ):
        self.dataset = dataset
        self.train = list(train)
        self.batch_size = batch_size
        self.seed = seed
        self.start = start
        self.stop = max(start, stop)
        self.rank = rank
        self.world = world
        self.processor = processor
        self.backbone = backbone

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> EditBatch:
        if not 0 <= i < len(self):
            raise IndexError(i)
        step = self.start + i
        indices = step_records(self.train, self.batch_size, self.seed, step)
        mine = shard(indices, self.rank, self.world)
        return encode_edits_batch(
            [self.dataset[j] for j in mine],
            self.dataset.task,
            self.processor,
            self.backbone,
            self.dataset.images,
        )


def keep_as_is(item: Any) -> Any:
    """DataLoader collate function for items that are batches already."""
    return item
