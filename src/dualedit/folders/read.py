"""Reading one version of a folder through one handle, every file verified against its manifest."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from dualedit.folders.checks import check_finite, manifest_checksum, sha256_bytes
from dualedit.folders.mapped import LAZY_MIN_BYTES, MappedFile, MappedTensor

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: How often a reader starts again when folders are swapped under it.
READ_ATTEMPTS = 5


class FolderChanged(Exception):
    """Internal: a file vanished while reading (a writer swapped the folder); read again."""


class FolderReader:
    """The files of one version of a folder, read through one open handle (see `read_folder`).

    Attributes:
        directory: the folder as given.
        manifest: the manifest record (None until `read_manifest`).
    """

    def __init__(self, directory: Path, fd: int):
        self.directory = directory
        self._fd = fd
        self.manifest: dict[str, Any] | None = None
        self.manifest_name: str | None = None

    def names(self) -> list[str]:
        """The names of this version's entries."""
        return os.listdir(self._fd)

    def exists(self, name: str) -> bool:
        """Whether this version of the folder has `name` (FolderChanged: the file is gone
        because a writer swapped the folder meanwhile; the read starts again)."""
        try:
            os.stat(name, dir_fd=self._fd)
        except FileNotFoundError:
            if self._swapped():
                raise FolderChanged(name) from None
            return False
        return True

    def read_bytes(self, name: str) -> bytes:
        with os.fdopen(self._open(name), "rb") as f:
            return f.read()

    def _open(self, name: str) -> int:
        """A read-only descriptor of this version's `name` (FolderChanged: swapped meanwhile)."""
        try:
            return os.open(name, os.O_RDONLY, dir_fd=self._fd)
        except FileNotFoundError:
            if self._swapped():
                raise FolderChanged(name) from None
            raise FileNotFoundError(f"{self.directory / name} not found") from None

    def read_manifest(self, name: str, *, what: str = "config") -> dict[str, Any]:
        """The manifest JSON object (errors name the file)."""
        path = self.directory / name
        if not self.exists(name):
            if self._swapped():
                raise FolderChanged(name)
            raise FileNotFoundError(f"{what} file {path} not found")
        record = _parse_json(self.read_bytes(name), path)
        if "files" in record or "checksum" in record:
            if record.get("checksum") != manifest_checksum(record):
                raise ValueError(
                    f"{path}: damaged or edited by hand (its checksum does not match its "
                    "content); save the folder again, or restore it from a copy (run-time "
                    "settings are options of the command, not edits of this file)"
                )
        self.manifest, self.manifest_name = record, name
        return record

    def checked(self) -> bool:
        """Whether the manifest lists its files (written since checksums exist)."""
        return isinstance((self.manifest or {}).get("files"), dict)

    def json(self, name: str) -> dict[str, Any]:
        """A JSON object file, verified against the manifest."""
        return _parse_json(self._verified(name), self.directory / name)

    def tensors(
        self, name: str, *, allow_nonfinite: Iterable[str] = (), check: bool = True
    ) -> dict[str, torch.Tensor]:
        """A safetensors file, verified against the manifest (size, SHA-256, dtypes, shapes)
        and, with `check`, refused if a tensor not in `allow_nonfinite` holds NaN or infinity
        (False: the caller checks, `check_finite`)."""
        path = self.directory / name
        data = self._verified(name)
        try:
            tensors = load_safetensors_bytes(data)
        except (SafetensorError, ValueError, RuntimeError) as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
        listed = self._entry(name).get("tensors") if self.checked() else None
        if listed is not None:
            have = {
                k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                for k, t in tensors.items()
            }
            if have != listed:
                wrong = sorted(k for k in set(have) | set(listed) if have.get(k) != listed.get(k))
                raise ValueError(f"{path}: tensors {wrong} differ from {self._manifest_path()}")
        if check:
            check_finite(tensors, path, allow=allow_nonfinite)
        return tensors

    def tensors_lazy(
        self, name: str, *, lazy: bool | None = None
    ) -> dict[str, torch.Tensor | MappedTensor]:
        """A safetensors file as `tensors(name, check=False)` gives it or, for a file written
        with block checksums, memory-mapped (`mapped.MappedTensor`: rows verified when first
        read). `lazy`: None maps files with blocks of at least `LAZY_MIN_BYTES`; True maps any
        file with blocks; False reads every file whole. A file without blocks is read whole."""
        entry = self._entry(name) if self.checked() else {}
        if lazy is False or "blocks" not in entry or (
                lazy is None and int(entry.get("bytes", 0)) < LAZY_MIN_BYTES):
            return dict(self.tensors(name, check=False))
        fd = self._open(name)
        try:
            return dict(MappedFile(fd, self.directory / name, entry,
                                   self._manifest_path()).tensors)
        finally:
            os.close(fd)  # the mapping keeps the file itself

    def _entry(self, name: str) -> dict[str, Any]:
        files = (self.manifest or {}).get("files")
        if not isinstance(files, dict) or not isinstance(files.get(name), dict):
            raise ValueError(f"{self._manifest_path()}: does not list {name} in \"files\"")
        return files[name]

    def _verified(self, name: str) -> bytes:
        data = self.read_bytes(name)
        if not self.checked():
            return data  # a folder written before checksums (the caller warned)
        entry = self._entry(name)
        digest = sha256_bytes(data)
        if len(data) != entry.get("bytes") or digest != entry.get("sha256"):
            if self._swapped():
                raise FolderChanged(name)
            raise ValueError(
                f"{self.directory / name}: damaged ({len(data)} bytes, sha256 {digest[:12]}…; "
                f"{self._manifest_path()} records {entry.get('bytes')} bytes, sha256 "
                f"{str(entry.get('sha256'))[:12]}…); save it again or restore it from a copy"
            )
        return data

    def _manifest_path(self) -> Path:
        return self.directory / (self.manifest_name or "manifest")

    def _swapped(self) -> bool:
        """Whether the path now names another folder than the one this reader holds."""
        try:
            now = os.stat(self.directory)
        except FileNotFoundError:
            return True
        held = os.fstat(self._fd)
        return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)


def read_folder(directory: str | os.PathLike, read: Callable[[FolderReader], T]) -> T:
    """`read(reader)` on one version of `directory`, started again (up to `READ_ATTEMPTS`
    times) when a writer swaps the folder under it.

    Raises:
        FileNotFoundError: no such folder.
        NotADirectoryError: not a folder.
        whatever `read` raises (the reader's errors name the file).
    """
    directory = Path(directory)
    for attempt in range(READ_ATTEMPTS):
        if not directory.exists():
            raise FileNotFoundError(f"{directory}: no such folder")
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory}: not a folder")
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            return read(FolderReader(directory, fd))
        except FolderChanged:
            logger.debug("%s changed while reading (attempt %d); reading again", directory, attempt)
        finally:
            os.close(fd)
    raise ValueError(f"{directory}: changed {READ_ATTEMPTS} times while being read; try again")


def _parse_json(data: bytes, path: Path) -> dict[str, Any]:
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record
