"""The write lock of a folder: a `filelock` lock file beside it (the folder itself is swapped)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import filelock

#: Seconds a writer waits for another writer of the same folder before `FolderLocked`.
LOCK_TIMEOUT_S = 120.0


class FolderLocked(TimeoutError):
    """Another process holds the folder's write lock (it is saving, or training into it)."""


def lock_path(directory: str | os.PathLike) -> Path:
    """The lock file of a folder: `.{name}.lock` beside it (the folder itself is swapped)."""
    directory = Path(directory).absolute()
    return directory.parent / f".{directory.name}.lock"


@contextlib.contextmanager
def folder_lock(
    directory: str | os.PathLike, *, timeout: float = LOCK_TIMEOUT_S, what: str = "folder"
) -> Iterator[None]:
    """Hold the write lock of `directory` (waits up to `timeout` seconds; 0: do not wait).

    Raises:
        FolderLocked: another process holds it, naming the folder and what to do.
    """
    path = lock_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path), timeout=timeout)
    try:
        lock.acquire()
    except filelock.Timeout as error:
        waited = f" after waiting {timeout:g} s" if timeout else ""
        raise FolderLocked(
            f"{directory}: another process is writing this {what} (lock {path} held{waited}); "
            "wait for it to finish, or use another folder"
        ) from error
    try:
        yield
    finally:
        lock.release()
