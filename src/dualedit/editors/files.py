"""Editor folders, the same for every method (PEFT-style, no pickles):

- `adapter_config.json`: `{"method": name, "format": 3, "config": {...}, "base_model",
  "model_type", "hidden_size", "depth", "base_fingerprint", "versions", ...}` plus what the
  method adds (for a weight editor: the edits it holds); loading dispatches on `"method"`. It is
  the folder's manifest (`dualedit.folders`): it lists every other file with its size and
  SHA-256, and carries its own checksum and the write's revision;
- `adapter_model.safetensors`: the method's tensors, when it has any (adapters, edited weights);
- what a method writes besides (DualEdit: its edit memory, `memory.json` + `memory.safetensors`).

A folder is written as a whole (a new folder swapped in) under a lock, and read through one
handle with every file verified. Folders written before checksums existed (format 2, and the
format-1 DualEdit adapter folders without a "method" field) are still read, with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dualedit.folders import (
    FolderReader,
    FolderWriter,
    check_finite,
    read_folder,
    write_folder,
)
from dualedit.version import versions

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EDITOR_FORMAT = 3
#: Format 1: DualEdit adapter folders without a "method" field; 2: no checksums.
READABLE_FORMATS = (1, 2, 3)
LEGACY_METHOD = "dualedit"
#: Fields every editor config of format >= 2 holds (no silent default on load).
REQUIRED_FIELDS = ("method", "config", "model_type", "hidden_size", "depth")
#: Further fields of format 3.
REQUIRED_SINCE_3 = ("base_fingerprint",)


@dataclass
class EditorFolder:
    """One version of an editor folder, read and verified as a whole.

    Attributes:
        path: the folder.
        meta: its config JSON ("method" filled in for format-1 folders).
        revision: the write's revision (None for folders written before revisions).
        files: every other file, read: {name: JSON object (.json) or tensors (.safetensors)}.
    """

    path: Path
    meta: dict[str, Any]
    revision: str | None
    files: dict[str, Any] = field(default_factory=dict)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The method's tensors ({} when it saved none), NaN and infinity refused."""
        tensors = self.files.get(WEIGHTS_FILE, {})
        check_finite(tensors, self.path / WEIGHTS_FILE)
        return tensors


def write_editor_folder(
    directory: str | os.PathLike,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor] | None = None,
    *,
    extra: Callable[[FolderWriter], list[str]] | None = None,
    expect_revision: str | None = None,
) -> str:
    """Write `meta` (with "method"; "format" and "versions" are added), `tensors` (if any) and
    what `extra(writer)` writes (it returns the names of the files it wrote), as a whole.

    Returns:
        The revision written.

    Raises:
        ValueError: no method name, or `directory` is a file.
        dualedit.folders.ConcurrentChange: another process saved the folder since the caller
            loaded revision `expect_revision`.
        dualedit.folders.FolderLocked: another process kept writing it for too long.
    """
    if not meta.get("method"):
        raise ValueError("an editor folder's config needs its method's name")
    record = {**meta, "format": EDITOR_FORMAT, "versions": versions()}
    with write_folder(
        directory, manifest=CONFIG_FILE, expect_revision=expect_revision, what="editor folder"
    ) as writer:
        covers = list(extra(writer)) if extra is not None else []
        if tensors:
            writer.tensors(WEIGHTS_FILE, tensors)
            covers.append(WEIGHTS_FILE)
        else:
            writer.drop(WEIGHTS_FILE)  # a method without tensors leaves none of an earlier save
        writer.manifest(CONFIG_FILE, record, covers=covers)
    return writer.revision


def read_editor_folder(directory: str | os.PathLike) -> EditorFolder:
    """Read and verify an editor folder (config, every file it lists).

    Raises:
        FileNotFoundError: no folder, or no config file in it.
        ValueError: not valid JSON, an unknown format, a missing field, a file that does not
            match its checksum, dtype or shape (each names the file and what to do).
    """
    directory = Path(directory)

    def read(reader: FolderReader) -> EditorFolder:
        meta = _read_meta(reader, directory)
        if meta["format"] >= 3:
            names = sorted(meta["files"])
        else:
            names = sorted(
                n for n in reader.names() if n.endswith((".json", ".safetensors"))
                and n != CONFIG_FILE and not n.startswith(".")
            )
            logger.warning(
                "%s: written before folders carried checksums (format %d); it is read "
                "unverified. Save it again (e.g. dualedit calibrate, or save_pretrained) to "
                "add them", directory, meta["format"]
            )
        files = {
            # A large edit memory is memory-mapped (read per edit on first use, `folders.mapped`).
            name: reader.tensors_lazy(name) if name.endswith(".safetensors")
            else reader.json(name)
            for name in names
        }
        return EditorFolder(directory, meta, meta.get("revision"), files)

    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: not a folder (an editor is saved as a folder)")
    if not directory.exists():
        raise FileNotFoundError(f"{directory / CONFIG_FILE} not found ({directory}: no such folder)")
    return read_folder(directory, read)


def read_editor_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The config JSON of an editor folder, checked (see `read_editor_folder`); its files are
    not read."""
    directory = Path(directory)

    if not directory.is_dir():
        what = "no such folder" if not directory.exists() else "not a folder"
        raise FileNotFoundError(f"{directory / CONFIG_FILE} not found ({directory}: {what})")
    return read_folder(directory, lambda reader: _read_meta(reader, directory))


def saved_method(directory: str | os.PathLike) -> str:
    """The method name an editor folder was saved by."""
    return read_editor_meta(directory)["method"]


def _read_meta(reader: FolderReader, directory: Path) -> dict[str, Any]:
    """The folder's config, read through `reader` and checked."""
    if not reader.exists(CONFIG_FILE):
        raise FileNotFoundError(
            f"{directory / CONFIG_FILE} not found ({directory}: not a saved editor folder)"
        )
    return _check_meta(reader.read_manifest(CONFIG_FILE, what="editor config"), directory)


def _check_meta(meta: dict[str, Any], directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if meta.get("format") not in READABLE_FORMATS:
        raise ValueError(
            f"{path}: editor folder format {meta.get('format')!r}; this version reads "
            f"{list(READABLE_FORMATS)}"
        )
    if meta["format"] == 1:
        meta = {**meta, "method": LEGACY_METHOD}
    required = REQUIRED_FIELDS + (REQUIRED_SINCE_3 if meta["format"] >= 3 else ())
    missing = [name for name in required if name not in meta]
    if meta["format"] >= 3 and not isinstance(meta.get("files"), dict):
        missing.append("files")
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}; the folder is incomplete or damaged")
    if not isinstance(meta["method"], str) or not meta["method"]:
        raise ValueError(f"{path}: no \"method\" field naming the editing method")
    if not isinstance(meta["config"], dict):
        raise ValueError(f"{path}: \"config\" must be a JSON object")
    return meta
