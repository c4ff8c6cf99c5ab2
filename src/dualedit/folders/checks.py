"""Checksums of saved files and manifests, and the check that tensors hold no NaN."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

#: Fields every manifest gets from the folder (a caller's record may not use them).
MANIFEST_FIELDS = ("files", "revision", "checksum")


def manifest_checksum(record: Mapping[str, Any]) -> str:
    """SHA-256 of a manifest's canonical JSON without its "checksum" field: a manifest edited
    by hand or damaged (a field removed, two lengths swapped) no longer matches it."""
    rest = {k: v for k, v in record.items() if k != "checksum"}
    return sha256_bytes(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_entry(
    data: bytes, tensors: Mapping[str, torch.Tensor], *, blocks: int | None = None
) -> dict[str, Any]:
    """The manifest entry of a tensor file: size, SHA-256, and each tensor's dtype and shape;
    with `blocks` (a block size in bytes), also the SHA-256 of each block, so the file can be
    read lazily and verified block by block (`mapped.py`)."""
    entry: dict[str, Any] = {
        "bytes": len(data),
        "sha256": sha256_bytes(data),
        "tensors": {
            name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for name, t in sorted(tensors.items())
        },
    }
    if blocks is not None:
        view = memoryview(data)
        entry["blocks"] = {"bytes": blocks, "sha256": [
            sha256_bytes(view[i:i + blocks]) for i in range(0, max(len(data), 1), blocks)]}
    return entry


def check_finite(
    tensors: Mapping[str, torch.Tensor], where: str | os.PathLike, *, allow: Iterable[str] = ()
) -> None:
    """ValueError naming the first tensor (not in `allow`) that holds NaN or infinity."""
    allow = set(allow)
    for name, tensor in tensors.items():
        if name in allow or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{where}: tensor {name!r} holds {bad} NaN or infinite value(s); the file is "
                "damaged or was saved from a diverged run"
            )
