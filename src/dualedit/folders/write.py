"""Writing a folder as a whole: a staging folder beside it, swapped in under the folder's lock."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors_bytes

from dualedit.folders.checks import (
    MANIFEST_FIELDS,
    manifest_checksum,
    sha256_bytes,
    tensor_entry,
)
from dualedit.folders.lock import LOCK_TIMEOUT_S, folder_lock
from dualedit.io import current_umask, process_running


class ConcurrentChange(ValueError):
    """The folder was saved by another process after this one loaded it."""


class FolderWriter:
    """Writes the files of one new folder (see `write_folder`); nothing is visible until the
    `with` block ends without an error."""

    def __init__(self, staging: Path, target: Path, revision: str):
        self.staging = staging
        self.target = target
        self.revision = revision
        self._entries: dict[str, dict[str, Any]] = {}
        self._dropped: set[str] = set()

    def tensors(
        self, name: str, tensors: Mapping[str, torch.Tensor], *, blocks: int | None = None
    ) -> dict[str, Any]:
        """Write a safetensors file; returns its manifest entry (with `blocks`, a block size in
        bytes, the entry also holds per-block checksums: the file can be read lazily,
        `FolderReader.tensors_lazy`)."""
        tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
        data = save_safetensors_bytes(tensors)
        self._write(name, data)
        self._entries[name] = tensor_entry(data, tensors, blocks=blocks)
        return self._entries[name]

    def text(self, name: str, text: str) -> dict[str, Any]:
        """Write a text file (UTF-8); returns its manifest entry."""
        data = text.encode("utf-8")
        self._write(name, data)
        self._entries[name] = {"bytes": len(data), "sha256": sha256_bytes(data)}
        return self._entries[name]

    def manifest(
        self, name: str, record: Mapping[str, Any], covers: Iterable[str] = ()
    ) -> dict[str, Any]:
        """Write a JSON manifest: `record` plus "files" (the entries of `covers`, written before
        in this folder) and "revision". Returns what was written."""
        covers = list(covers)
        unknown = [c for c in covers if c not in self._entries]
        if unknown:
            raise ValueError(f"manifest {name}: files {unknown} were not written before it")
        clash = sorted(set(MANIFEST_FIELDS) & set(record))
        if clash:
            raise ValueError(f"manifest {name}: fields {clash} are written by the folder itself")
        full = {
            **record,
            "files": {c: self._entries[c] for c in sorted(covers)},
            "revision": self.revision,
        }
        full["checksum"] = manifest_checksum(full)
        self.text(name, json.dumps(full, indent=1, sort_keys=True))
        return full

    def drop(self, *names: str) -> None:
        """Files of the old folder not to carry over (a method's files it no longer writes)."""
        self._dropped.update(names)

    def entry(self, name: str) -> dict[str, Any]:
        return self._entries[name]

    def written(self) -> set[str]:
        return set(self._entries)

    def _write(self, name: str, data: bytes) -> None:
        if "/" in name or name.startswith("."):
            raise ValueError(f"folder file name {name!r}: a plain name expected")
        path = self.staging / name
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(path, 0o666 & ~current_umask())


@contextlib.contextmanager
def write_folder(
    directory: str | os.PathLike,
    *,
    manifest: str,
    expect_revision: str | None = None,
    timeout: float = LOCK_TIMEOUT_S,
    what: str = "folder",
) -> Iterator[FolderWriter]:
    """Write a new version of `directory` as a whole (see the module docstring).

    Args:
        manifest: the name of the folder's manifest (read for `expect_revision`).
        expect_revision: the revision the caller loaded ("" for a folder written before
            revisions); if the folder's manifest now has another, `ConcurrentChange` (None: no
            check, the folder is simply replaced; a folder removed meanwhile is written anew).
        timeout: seconds to wait for another writer.

    Raises:
        ValueError: `directory` exists and is not a folder.
        FolderLocked: another writer held the lock past `timeout`.
        ConcurrentChange: see `expect_revision`.

    Example:
        >>> with write_folder("runs/x/best", manifest="adapter_config.json") as w:
        ...     w.tensors("adapter_model.safetensors", tensors)
        ...     w.manifest("adapter_config.json", meta, covers=["adapter_model.safetensors"])
    """
    target = Path(directory).absolute()
    if target.is_symlink():
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{directory}: exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(target, timeout=timeout, what=what):
        if expect_revision is not None and target.is_dir():
            now = current_revision(target, manifest) or ""
            if now != expect_revision:
                raise ConcurrentChange(
                    f"{directory}: saved by another process after this one loaded it (revision "
                    f"{expect_revision}, now {now}); nothing was written. Load the folder again "
                    "and repeat the change, or save to another folder"
                )
        remove_stale_staging(target)
        staging = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.staging"
        staging.mkdir()
        try:
            writer = FolderWriter(staging, target, secrets.token_hex(8))
            yield writer
            if target.is_dir():
                _carry_over(target, staging, writer.written() | writer._dropped)
            os.chmod(staging, 0o777 & ~current_umask())
            _fsync_dir(staging)
            _swap_in(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        _fsync_dir(target.parent)


def replace_folder(
    source: str | os.PathLike, directory: str | os.PathLike, *, timeout: float = LOCK_TIMEOUT_S
) -> Path:
    """Make `directory` a copy of the folder `source` (every file), replacing it as a whole."""
    source = Path(source)
    target = Path(directory)
    with write_folder(target, manifest="", timeout=timeout) as writer:
        for entry in sorted(source.iterdir()):
            if entry.is_dir():
                shutil.copytree(entry, writer.staging / entry.name)
            else:
                shutil.copy2(entry, writer.staging / entry.name)
        if target.is_dir():  # nothing of the old folder stays
            writer.drop(*(p.name for p in target.iterdir()))
    return target


def current_revision(directory: str | os.PathLike, manifest: str) -> str | None:
    """The "revision" in a folder's manifest now (None: no folder, manifest or revision)."""
    if not manifest:
        return None
    try:
        record = json.loads((Path(directory) / manifest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("revision") if isinstance(record, dict) else None


def remove_stale_staging(directory: str | os.PathLike) -> list[Path]:
    """Remove the staging folders of `directory` left by writers that are no longer running."""
    target = Path(directory).absolute()
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[0-9a-f]+\.staging$")
    removed = []
    if not target.parent.is_dir():
        return removed
    for candidate in target.parent.iterdir():
        match = pattern.match(candidate.name)
        if match and not process_running(int(match.group(1))):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def _carry_over(old: Path, new: Path, managed: set[str]) -> None:
    """Link (or copy) the entries of `old` that the new write does not manage into `new`."""
    for entry in old.iterdir():
        if entry.name in managed or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _swap_in(staging: Path, target: Path) -> None:
    """Put `staging` at `target`; the old folder (if any) ends at `staging`, then removed."""
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)
        return
    old = staging.with_name(staging.name.replace(".staging", ".old"))
    os.rename(target, old)  # elsewhere: a moment without the folder, never a mix
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # an old kernel or a file system without exchange
    raise OSError(code, f"swapping {a} into {b}: {os.strerror(code)}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
