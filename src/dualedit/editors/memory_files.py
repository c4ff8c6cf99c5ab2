"""How an `EditStore` is saved and read (a mixin of `memory.EditStore`): one safetensors file
and one JSON index that is the folder's manifest (`dualedit.folders`), checked against each other
before anything changes."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dualedit.folders import (
    MANIFEST_FIELDS,
    FolderReader,
    FolderWriter,
    check_finite,
    read_folder,
    write_folder,
)
from dualedit.folders.mapped import BLOCK_BYTES, LazyRows, MappedTensor, lazy_split, materialize

logger = logging.getLogger(__name__)

MAX_ID_LENGTH = 64
#: Index field naming the sequence fields written once under an earlier field (their tensors
#: are the same objects for every edit).
SAME_AS = "same_as"


def check_id(edit_id: object) -> int | str:
    """`edit_id` if it is a valid id (an int, or a str of 1..64 characters), else ValueError."""
    if not (is_int(edit_id) or isinstance(edit_id, str)):
        raise ValueError(f"edit id must be an int or a str, got {edit_id!r}")
    if isinstance(edit_id, str) and not 0 < len(edit_id) <= MAX_ID_LENGTH:
        raise ValueError(f"edit id must have 1..{MAX_ID_LENGTH} characters, got {edit_id!r}")
    return edit_id


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def empty_dtype(field: Any) -> torch.dtype:
    return field.dtype or torch.float32


def _castable(stored: torch.dtype, wanted: torch.dtype) -> bool:
    return stored.is_floating_point == wanted.is_floating_point



class StoreFiles:
    """The file methods of `EditStore` (it provides `fields`, the columns and `_append`)."""

    # -- files --------------------------------------------------------------------------------

    def write(
        self,
        writer: FolderWriter,
        *,
        index_file: str,
        tensors_file: str,
        meta: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Write `tensors_file` (safetensors) and `index_file` (sorted JSON: `meta` plus the
        store's fields, the tensor file's checksum) into a folder being written (`folders`).

        Returns:
            The names written.
        """
        meta = dict(meta or {})
        clash = sorted(set(meta) & (self._index_fields() | {SAME_AS} | set(MANIFEST_FIELDS)))
        if clash:
            raise ValueError(f"save(): meta field(s) {clash} are written by the store itself")
        same = self._same_columns()
        tensors = {}
        for name, field in self.fields.items():
            column = self._columns[name]
            if name in same:
                continue  # the same tensors as an earlier field's: written once, under it
            if not column:
                tensors[name] = torch.zeros((0, field.width), dtype=empty_dtype(field))
            elif field.sequence:  # [total rows, width]
                tensors[name] = torch.cat([materialize(t).cpu() for t in column])
            else:
                tensors[name] = torch.stack([materialize(t).cpu() for t in column])  # [n, width]
        index = {
            **meta,
            "next_id": self._next_id,
            "ids": self._ids,
            "info": self._info,
            **{
                f"{name}_lengths": [int(t.shape[0]) for t in self._columns[name]]
                for name in self._sequences()
            },
        }
        if same:
            index[SAME_AS] = same
        # Block checksums: a large store loads lazily (`read_files`), each edit verified on use.
        writer.tensors(tensors_file, tensors, blocks=BLOCK_BYTES)
        writer.manifest(index_file, index, covers=[tensors_file])
        return [tensors_file, index_file]

    def _same_columns(self) -> dict[str, str]:
        """{field: earlier field} for sequence fields that hold the very same tensors as an
        earlier one for every edit (DualEdit's text and visual states when the two layers are one
        and the text adapter reads every position)."""
        same: dict[str, str] = {}
        names = self._sequences()
        for j, name in enumerate(names):
            column = self._columns[name]
            for earlier in names[:j]:
                other = self._columns[earlier]
                if earlier not in same and column and len(column) == len(other) and all(
                    a is b for a, b in zip(column, other)
                ):
                    same[name] = earlier
                    break
        return same

    def save(
        self,
        directory: str | os.PathLike,
        *,
        index_file: str,
        tensors_file: str,
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the store to `directory` as a whole (`write`; other files of the folder are
        kept), under its lock.

        Raises:
            dualedit.folders.ConcurrentChange: the store was read from (or last saved to)
                `directory` and another process saved it since; nothing is written.

        Returns:
            The directory.
        """
        key = str(Path(directory).absolute().resolve())
        with write_folder(
            directory,
            manifest=index_file,
            expect_revision=self._revisions.get(key),
            what="edit store",
        ) as writer:
            self.write(writer, index_file=index_file, tensors_file=tensors_file, meta=meta)
        self._revisions[key] = writer.revision
        return Path(directory)

    @staticmethod
    def read_files(
        directory: str | os.PathLike, *, index_file: str, tensors_file: str,
        lazy: bool | None = None,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor | MappedTensor], str | None]:
        """The index and tensors of a saved store, verified against each other's checksums
        (one version of the folder, see `folders.read_folder`), and its revision.

        `lazy` (`FolderReader.tensors_lazy`): None memory-maps a large tensor file written with
        block checksums, so its sequences are read, and verified, only when an edit's are first
        used (`take`); True maps any such file; False reads and verifies the whole file now.

        Raises:
            FileNotFoundError: the folder or a file is missing.
            ValueError: a file is damaged or not what it should be (named).
        """
        directory = Path(directory)
        if not directory.is_dir():
            what = "no such folder" if not directory.exists() else "not a folder"
            raise FileNotFoundError(
                f"edit store file {directory / index_file} not found ({directory}: {what})"
            )

        def read(reader: FolderReader) -> tuple[dict[str, Any], dict[str, Any], str | None]:
            index = reader.read_manifest(index_file, what="edit store")
            if not reader.checked():
                logger.warning(
                    "%s: written before edit stores carried checksums; read unverified. Save it "
                    "again to add them", directory / index_file
                )
            if not reader.exists(tensors_file):
                raise FileNotFoundError(f"edit store file {directory / tensors_file} not found")
            return index, reader.tensors_lazy(tensors_file, lazy=lazy), index.get("revision")

        return read_folder(directory, read)

    def read(
        self,
        directory: str | os.PathLike,
        *,
        index_file: str,
        tensors_file: str,
        fill: Mapping[str, float] | None = None,
        share: Sequence[tuple[str, str]] = (),
        allow_nonfinite: Iterable[str] = (),
        lazy: bool | None = None,
    ) -> dict[str, Any]:
        """Replace the edits by those saved in `directory` by `save` (see `take`; `lazy` as
        `read_files`).

        Returns:
            The index (the caller's meta is in it).
        """
        directory = Path(directory)
        index, tensors, revision = self.read_files(
            directory, index_file=index_file, tensors_file=tensors_file, lazy=lazy
        )
        self.take(
            index,
            tensors,
            index_path=directory / index_file,
            tensors_path=directory / tensors_file,
            fill=fill,
            share=share,
            allow_nonfinite=allow_nonfinite,
        )
        self._revisions[str(directory.absolute().resolve())] = revision or ""
        return index

    def take(
        self,
        index: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor | MappedTensor],
        *,
        index_path: Path,
        tensors_path: Path,
        fill: Mapping[str, float] | None = None,
        share: Sequence[tuple[str, str]] = (),
        allow_nonfinite: Iterable[str] = (),
    ) -> None:
        """Replace the edits by those of a saved index and its tensors; everything is checked
        before anything changes, so a refused file leaves the store as it was.

        Memory-mapped tensors (`read_files` with `lazy`): vectors (keys) are read and checked
        now; each edit's rows of a sequence stay unread (`mapped.LazyRows`) until first used,
        when they are verified against the file's block checksums and checked finite, and a
        damaged block is refused naming the file.

        Args:
            index_path, tensors_path: where they were read from (for the messages).
            fill: {vector name: value} for tensors a file may lack (written before the name
                existed): each edit gets a vector full of `value`.
            share: pairs of names whose tensors, where equal, are kept once (as when `add` was
                given one tensor for both).
            allow_nonfinite: names whose tensors may hold NaN (a key part unknown for edits
                stored before it existed); every other tensor with NaN or infinity is refused.

        Raises:
            ValueError: the files are malformed or disagree; the message names the file and what
                is wrong (missing or unexpected tensors, lengths that do not match the tensors,
                ids not unique or malformed, NaN, ...).
        """
        index = dict(index)
        ids, info, lengths = self._check_index(index, index_path)
        tensors = dict(tensors)
        same = self._check_same(index, tensors, lengths, index_path, tensors_path)
        for name, earlier in same.items():
            tensors[name] = tensors[earlier]
        allow_nonfinite = set(allow_nonfinite)
        for name, tensor in list(tensors.items()):
            field = self.fields.get(name)
            if isinstance(tensor, MappedTensor) and (field is None or not field.sequence):
                tensors[name] = tensor.rows()  # a vector field (keys): read and verified now
        check_finite({k: t for k, t in tensors.items() if torch.is_tensor(t)}, tensors_path,
                     allow=allow_nonfinite)
        for name, value in (fill or {}).items():
            if name not in tensors:
                field = self._vector(name)
                shape = (len(ids), field.width)
                tensors[name] = torch.full(shape, value, dtype=empty_dtype(field))
        if set(tensors) != set(self.fields):
            raise ValueError(
                f"{tensors_path}: missing {sorted(set(self.fields) - set(tensors))}, "
                f"unexpected {sorted(set(tensors) - set(self.fields))}"
            )
        rows: dict[str, Sequence[torch.Tensor]] = {}
        for name, field in self.fields.items():
            tensor, listed = tensors[name], f"{name}_lengths" if field.sequence else "ids"
            want = (sum(lengths[name]) if field.sequence else len(ids), field.width)
            if tuple(tensor.shape) != want:
                raise ValueError(
                    f"{tensors_path}: {name} has {tensor.shape[0] if tensor.dim() else 0} "
                    f"positions along dim 0 (shape {tuple(tensor.shape)}), {index_path} lists "
                    f"{want[0]} ({listed}) of width {want[1]}"
                )
            if not _castable(tensor.dtype, empty_dtype(field)):
                raise ValueError(
                    f"{tensors_path}: {name} is stored as {tensor.dtype}, expected a floating "
                    f"dtype like {field.dtype}"
                )
            if isinstance(tensor, MappedTensor):  # unread rows per edit
                rows[name] = lazy_split(tensor, lengths[name], dtype=field.dtype,
                                        device=self.device,
                                        check_finite=name not in allow_nonfinite)
            elif field.sequence:  # each edit's rows its own copy (freed with the edit)
                rows[name] = [t.clone().to(device=self.device, dtype=field.dtype)
                              for t in (tensor.split(lengths[name]) if ids else ())]
            else:  # vectors: one copy of the matrix, a row of it per edit (10,000 clones cost 1 s)
                matrix = tensor.to(device=self.device, dtype=field.dtype)
                rows[name] = (matrix.clone() if matrix is tensor else matrix).unbind(0)
        self.clear()
        for i, edit_id in enumerate(ids):
            row = {name: rows[name][i] for name in self.fields}
            for name, earlier in same.items():
                row[name] = row[earlier]
            for first, second in share:
                a, b = row[first], row[second]
                if isinstance(a, LazyRows) or isinstance(b, LazyRows):
                    continue  # unread: compared (and shared) only when read whole
                if a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b):
                    row[second] = a
            self._append(edit_id, row, dict(info[i]))
        self._next_id = max(self._next_id, index["next_id"])
        self._cache.clear()

    def _check_same(
        self,
        index: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        lengths: Mapping[str, list[int]],
        index_path: Path,
        tensors_path: Path,
    ) -> dict[str, str]:
        """The index's {field: earlier field written in its place}, checked: sequence fields,
        the same lengths, the field itself absent from the tensor file."""
        same = index.get(SAME_AS, {})
        sequences = self._sequences()
        if not isinstance(same, dict) or not all(
            a in sequences and b in sequences and a != b for a, b in same.items()
        ):
            raise ValueError(f"{index_path}: {SAME_AS} must map sequence fields to others")
        for name, earlier in same.items():
            if lengths[name] != lengths[earlier]:
                raise ValueError(
                    f"{index_path}: {name} is stored as {earlier} but their lengths differ"
                )
            if name in tensors:
                raise ValueError(f"{tensors_path}: holds {name}, which {index_path} stores "
                                 f"as {earlier}")
        return same

    def _check_index(
        self, index: Mapping[str, Any], path: Path
    ) -> tuple[list[int | str], list[dict[str, Any]], dict[str, list[int]]]:
        """ids, info and per-sequence lengths of an index, checked against each other."""
        missing = sorted(self._index_fields() - set(index))
        if missing:
            raise ValueError(f"{path}: missing field(s) {missing}")
        ids, info = index["ids"], index["info"]
        lengths = {name: index[f"{name}_lengths"] for name in self._sequences()}
        if not is_int(index["next_id"]):
            raise ValueError(f"{path}: next_id must be an int, got {index['next_id']!r}")
        if not (isinstance(ids, list) and isinstance(info, list)) or not all(
            isinstance(entry, dict) for entry in info
        ):
            raise ValueError(f"{path}: ids must be a list, info a list of JSON objects")
        for name, counts in lengths.items():
            if not isinstance(counts, list) or not all(is_int(c) and c > 0 for c in counts):
                raise ValueError(f"{path}: {name}_lengths must be a list of positive ints")
        sizes = {"ids": len(ids), "info": len(info)}
        sizes |= {f"{name}_lengths": len(counts) for name, counts in lengths.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{path}: ids, lengths and info disagree in length {sizes}")
        for edit_id in ids:
            try:
                check_id(edit_id)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from error
        repeated = [eid for eid, count in Counter(ids).items() if count > 1]
        if repeated:
            raise ValueError(f"{path}: ids not unique: {repeated} appear more than once")
        return ids, info, lengths

