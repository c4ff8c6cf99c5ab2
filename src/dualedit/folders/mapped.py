"""Large tensor files read lazily: memory-mapped, verified block by block as their rows are used.

A tensor file written with block checksums (`FolderWriter.tensors(..., blocks=True)`: the SHA-256
of every `BLOCK_BYTES` of the file in its manifest entry) can be opened without reading it
(`FolderReader.tensors_lazy`): its header is checked against the manifest at once (size, names,
dtypes, shapes), and each range of rows a caller takes (`MappedTensor.rows`) is checked against
the checksums of the blocks it covers the first time, so a damaged block is refused, naming the
file, when it is first used. The rows are views of a private (copy-on-write) mapping: nothing is
copied, and writing into them never reaches the file. `LazyRows` is one such range kept unread
until first use (an edit's states in an edit store of thousands).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterable, Mapping
from math import prod
from pathlib import Path
from typing import Any

import torch

from dualedit.folders.checks import check_finite, sha256_bytes

#: Size of the checksummed blocks of a file written with blocks.
BLOCK_BYTES = 1 << 20
#: Files with block checksums smaller than this are still read whole and verified at once (a
#: damaged small file is refused on load, and reading it costs little).
LAZY_MIN_BYTES = 32 << 20

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class MappedFile:
    """One memory-mapped safetensors file of a folder, with the blocks verified so far.

    Raises (on opening):
        ValueError: the file's size, header or tensors differ from its manifest entry (named).
    """

    def __init__(self, fd: int, path: Path, entry: Mapping[str, Any], manifest_path: Path):
        self.path = path
        blocks = entry.get("blocks") or {}
        self._block = int(blocks.get("bytes", 0))
        self._hashes = list(blocks.get("sha256", []))
        size = os.fstat(fd).st_size
        if size != entry.get("bytes") or self._block <= 0 or len(self._hashes) != max(
                1, -(-size // self._block)):
            raise ValueError(f"{path}: damaged ({size} bytes; {manifest_path} records "
                             f"{entry.get('bytes')} bytes in {len(self._hashes)} blocks); save it "
                             "again or restore it from a copy")
        self._map = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)  # [size], no copy
        self._verified: set[int] = set()
        header_len = int.from_bytes(self._map[:8], "little")
        try:
            header = json.loads(self._map[8:8 + header_len].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
        self.verify(0, 8 + header_len)
        header.pop("__metadata__", None)
        start = 8 + header_len
        self.tensors: dict[str, MappedTensor] = {}
        listed = entry.get("tensors")
        have = {}
        for name, info in header.items():
            dtype = _DTYPES.get(info.get("dtype"))
            begin, end = info.get("data_offsets", (0, -1))
            shape = torch.Size(info.get("shape", []))
            if dtype is None or not 0 <= begin <= end <= size - start or (
                    end - begin != prod(shape) * _itemsize(dtype)):
                raise ValueError(f"{path}: not a readable safetensors file (tensor {name!r})")
            self.tensors[name] = MappedTensor(self, name, dtype, shape, start + begin)
            have[name] = {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape)}
        if listed is not None and have != listed:
            wrong = sorted(k for k in set(have) | set(listed) if have.get(k) != listed.get(k))
            raise ValueError(f"{path}: tensors {wrong} differ from {manifest_path}")

    def verify(self, start: int, stop: int) -> None:
        """Check the blocks covering bytes [start, stop) against their checksums (once each).

        Raises:
            ValueError: a block does not match (the file is damaged), naming the file.
        """
        if stop <= start:
            return
        for block in range(start // self._block, (stop - 1) // self._block + 1):
            if block in self._verified:
                continue
            data = self._map[block * self._block:(block + 1) * self._block]
            if sha256_bytes(data) != self._hashes[block]:
                raise ValueError(f"{self.path}: damaged (block {block} of {len(self._hashes)}, "
                                 f"bytes {block * self._block}-{block * self._block + len(data)}"
                                 ", does not match its checksum); save it again or restore it "
                                 "from a copy")
            self._verified.add(block)

    def view(self, start: int, stop: int) -> torch.Tensor:
        """Bytes [start, stop) of the mapping, verified: a uint8 view (no copy)."""
        self.verify(start, stop)
        return self._bytes[start:stop]


class MappedTensor:
    """One tensor of a `MappedFile`: its dtype and shape known, its rows read on demand."""

    def __init__(self, file: MappedFile, name: str, dtype: torch.dtype, shape: torch.Size,
                 offset: int):
        self.file, self.name, self.dtype, self.shape = file, name, dtype, shape
        self._offset = offset
        self._row_bytes = prod(shape[1:]) * _itemsize(dtype) if len(shape) else _itemsize(dtype)

    def __repr__(self) -> str:
        return f"MappedTensor({self.name!r}, {tuple(self.shape)}, {self.dtype}, {self.file.path})"

    def dim(self) -> int:
        return len(self.shape)

    def rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0 (all by default), verified, as a view of the mapping
        (a copy only where the file's alignment does not allow a view)."""
        if not self.shape:
            return self.file.view(self._offset, self._offset + self._row_bytes).view(
                self.dtype).reshape(())
        stop = self.shape[0] if stop is None else stop
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"{self.name}: rows {start}:{stop} of {self.shape[0]}")
        raw = self.file.view(self._offset + start * self._row_bytes,
                             self._offset + stop * self._row_bytes)
        if raw.storage_offset() % _itemsize(self.dtype):
            raw = raw.clone()
        return raw.view(self.dtype).reshape(stop - start, *self.shape[1:])


class LazyRows:
    """Rows [start, stop) of a `MappedTensor`, read (verified, checked finite unless allowed,
    converted and moved) on the first `get()` and kept.

    Attributes:
        shape: the rows' shape, known without reading them.
    """

    __slots__ = ("_source", "_start", "_stop", "_dtype", "_device", "_finite", "_tensor")

    def __init__(self, source: MappedTensor, start: int, stop: int, *,
                 dtype: torch.dtype | None = None, device: torch.device | None = None,
                 check_finite: bool = True):
        self._source, self._start, self._stop = source, start, stop
        self._dtype, self._device, self._finite = dtype, device, check_finite
        self._tensor: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._stop - self._start, *self._source.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype or self._source.dtype

    def numel(self) -> int:
        return prod(self.shape)

    def element_size(self) -> int:
        return _itemsize(self.dtype)

    def get(self) -> torch.Tensor:
        """The rows as a tensor (read the first time; ValueError naming the file if damaged)."""
        if self._tensor is None:
            rows = self._source.rows(self._start, self._stop)
            if self._finite:
                check_finite({self._source.name: rows}, self._source.file.path)
            self._tensor = rows.to(device=self._device, dtype=self._dtype)
        return self._tensor


def materialize(value: torch.Tensor | LazyRows) -> torch.Tensor:
    """A tensor, reading a `LazyRows` first."""
    return value.get() if isinstance(value, LazyRows) else value


def lazy_split(source: MappedTensor, lengths: Iterable[int], **kwargs: Any) -> list[LazyRows]:
    """`source` split along dim 0 into unread ranges of `lengths` rows (as `Tensor.split`)."""
    out, start = [], 0
    for n in lengths:
        out.append(LazyRows(source, start, start + n, **kwargs))
        start += n
    return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
