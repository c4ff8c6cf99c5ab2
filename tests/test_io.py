"""Atomic writes: the umask is respected, a killed writer's temp file does not last, and a
concurrent writer's temp file is left alone."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dualedit.io import atomic_save_safetensors, atomic_write_text, current_umask, remove_stale_temp_files


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_get_the_mode_of_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        text = atomic_write_text(tmp_path / "a.json", "{}")
        tensors = atomic_save_safetensors({"x": torch.ones(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    for path in (text, tensors):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert text.read_text() == "{}" and torch.equal(load_file(str(tensors))["x"], torch.ones(2))


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "state.json"
    stale = tmp_path / f".state.json.{dead_pid()}.abc123.tmp"
    live = tmp_path / f".state.json.{os.getppid()}.def456.tmp"  # a running process's
    other = tmp_path / f".other.json.{dead_pid()}.abc123.tmp"  # another file's
    for path in (stale, live, other):
        path.write_text("half")
    atomic_write_text(target, "done")
    assert not stale.exists() and live.exists() and other.exists()
    assert target.read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == sorted(
        [live.name, other.name]
    )
    assert remove_stale_temp_files(tmp_path / "other.json") == [other]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(TypeError):
        atomic_write_text(target, 123)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
