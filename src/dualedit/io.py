"""Atomic file writes: a reader never sees a half-written file, a killed writer leaves none that
lasts.

Each write goes to a temp file in the target's folder (`.{name}.{pid}.{random}.tmp`), is flushed
to disk, given the mode a plain `open()` would give under the process's umask, and renamed over
the target with `os.replace`. A writer killed before the rename leaves its temp file behind; the
next write of the same file removes the temp files of writers that are no longer running (the
pid in the name says whose it is, so a concurrent writer's file is left alone).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Mapping

import torch


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (see the module docstring).

    Returns:
        The path written.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return _atomic(Path(path), write)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """safetensors `save_file` to `path` atomically (see the module docstring)."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(dict(tensors), str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    return _atomic(Path(path), write)


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Atomically write `path` by calling `write(tmp)`, which writes the whole file at `tmp`
    (e.g. a figure's `savefig`); see the module docstring."""

    def write_and_sync(tmp: Path) -> None:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    return _atomic(Path(path), write_and_sync)


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 whatever the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, so nothing is changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: set and restore (not thread-safe, done once per write)
    os.umask(mask)
    return mask


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files of `path` left by writers that are no longer running.

    Returns:
        The files removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp$")
    removed = []
    for candidate in path.parent.iterdir():
        match = pattern.match(candidate.name)
        if match and not process_running(int(match.group(1))):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def process_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
