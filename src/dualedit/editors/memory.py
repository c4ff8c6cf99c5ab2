"""The edit store: many edits in insertion order, addressed by stable ids, each with named
tensors and a description, and the nearest stored edit for an input. Shared by every method
that keeps a memory of edits (DualEdit's states and gate keys, retrieval of demonstrations,
one neuron per edit).

Which tensors an edit holds is declared once (`Field`): a vector of fixed width per edit (a
key: `stacked`, `nearest`, `top_k` compare inputs with them by cosine similarity), or a
sequence of rows whose count differs between edits (states). A method with its own similarity
computes a [batch, n_edits] matrix itself and picks with `argmax_rows` / `top_k_rows`.

Files (`save` / `read`): one safetensors file (per name, the tensors of all edits concatenated
along dim 0: vectors as [n_edits, width], sequences as [total rows, width]) and one sorted JSON
index (the caller's meta, `ids`, `next_id`, `info` and `<name>_lengths` per sequence), which is
the folder's manifest: it records the tensor file's size and SHA-256 and its own checksum. The
folder is written as a whole under a lock and read through one handle (`dualedit.folders`), so
a damaged, hand-edited or half-replaced store is refused by name. No pickles.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dualedit.editors.base import EditId
from dualedit.editors.memory_files import (  # noqa: F401  (check_id, MAX_ID_LENGTH: re-exported)
    MAX_ID_LENGTH,
    StoreFiles,
    check_id,
    empty_dtype,
    is_int,
)
from dualedit.folders.mapped import materialize
from dualedit.options import read_json_object

logger = logging.getLogger(__name__)

#: Index fields the store writes (and "<name>_lengths" per sequence); not for a caller's meta.
STORE_FIELDS = ("ids", "info", "next_id")


@dataclass(frozen=True)
class Field:
    """One named tensor that every edit of a store holds.

    Attributes:
        width: the size of its last dimension.
        sequence: False: one [width] vector per edit (a key); True: [rows, width] with
            rows >= 1 differing between edits (states), saved with per-edit lengths.
        dtype: the dtype tensors are converted to on `add` (None: each keeps its own); also the
            dtype of the [0, width] tensor an empty store saves (None: float32).
    """

    width: int
    sequence: bool = False
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not is_int(self.width) or self.width < 1:
            raise ValueError(f"Field: width must be a positive int, got {self.width!r}")


def argmax_rows(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The best column of each row: [batch, n] -> (positions [batch] long, similarity [batch])."""
    best, positions = similarity.max(dim=-1)
    return positions, best


def top_k_rows(similarity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best columns of each row, best first: [batch, n] -> ([batch, k'], [batch, k']) with
    k' = min(k, n) (a store of fewer edits than k gives them all)."""
    if not is_int(k) or k < 1:
        raise ValueError(f"top_k: k must be a positive int, got {k!r}")
    best, positions = similarity.topk(min(k, similarity.shape[-1]), dim=-1)
    return positions, best


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of an index file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid JSON, or not a JSON object (the message names the file).
    """
    return read_json_object(path, what="edit store")


class EditStore(StoreFiles):
    """Edits in insertion order, addressed by stable ids, each with the tensors of `fields`
    and an info dict (JSON-able: prompt, target, image, ...).

    Ids are the caller's (an int, or a str of at most 64 characters) or the next int the store
    gives; the int counter only counts up, so an id is never reused after `remove` or `clear`.
    A tensor given under two names of one edit is kept, and counted in `nbytes`, once.

    Args:
        fields: {name: Field}, the tensors every edit holds (in this order in files).
        device: where tensors are kept (None: where they are given).

    Example:
        >>> store = EditStore({"key": Field(64), "states": Field(64, sequence=True)})
        >>> a = store.add({"key": k, "states": h}, {"prompt": "what is it?"})
        >>> positions, similarity = store.nearest(queries, "key")  # [batch], [batch]
        >>> store.ids[positions[0]]
    """

    def __init__(self, fields: Mapping[str, Field], *, device: torch.device | str | None = None):
        bad = [name for name, field in fields.items() if not isinstance(field, Field)]
        if not fields or bad:
            raise TypeError(f"EditStore: fields must be a non-empty {{name: Field}}, bad: {bad}")
        self.fields = dict(fields)
        self.device = torch.device(device) if device is not None else None
        self._ids: list[EditId] = []
        self._position: dict[EditId, int] = {}
        self._columns: dict[str, list[torch.Tensor]] = {name: [] for name in self.fields}
        self._info: list[dict[str, Any]] = []
        self._next_id = 0
        # Values computed from the edits (stacked matrices, a method's own), dropped on change.
        self._cache: dict[Hashable, Any] = {}
        # {folder: revision} of the folders read or saved (lost updates refused, folders.py).
        self._revisions: dict[str, str | None] = {}

    def __repr__(self) -> str:
        return f"EditStore({len(self)} edits, fields={list(self.fields)})"

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, edit_id: object) -> bool:
        return edit_id in self._position

    @property
    def ids(self) -> list[EditId]:
        """Ids in insertion order (the order of positions everywhere)."""
        return list(self._ids)

    def position(self, edit_id: EditId) -> int:
        """The index of an edit in `ids` (KeyError naming the id if none)."""
        if edit_id not in self._position:
            raise KeyError(f"no edit with id {edit_id!r} in the store ({len(self)} edits)")
        return self._position[edit_id]

    # -- adding and removing ------------------------------------------------------------------

    def new_id(self, edit_id: EditId | None = None) -> EditId:
        """The id `add` would give: `edit_id` checked (ValueError: not an int or a short str, or
        already in use), or the next int when None."""
        if edit_id is None:
            return self._next_id  # above every int id in use (`_append` keeps it so)
        check_id(edit_id)
        if edit_id in self._position:
            raise ValueError(f"edit id {edit_id!r} is already in the store")
        return edit_id

    def add(
        self,
        tensors: Mapping[str, torch.Tensor],
        info: Mapping[str, Any] | None = None,
        *,
        edit_id: EditId | None = None,
    ) -> EditId:
        """Store one edit and return its id.

        Args:
            tensors: {name: tensor} for every field: a vector [width], or a sequence
                [rows >= 1, width]. Detached and moved to the store's device (not copied
                otherwise: do not change them in place afterwards).
            info: a JSON-able description (prompt, target, image, ...), saved with the store.
            edit_id: a short string (<= 64 characters) or an int; None for the next int.

        Raises:
            ValueError: an id already in use or malformed, missing or unexpected names, a
                wrong shape, or an info that is not JSON-able.
        """
        return self.add_many([tensors], [info], edit_ids=[edit_id])[0]

    def add_many(
        self,
        tensors: Sequence[Mapping[str, torch.Tensor]],
        infos: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        edit_ids: Sequence[EditId | None] | None = None,
    ) -> list[EditId]:
        """Store several edits at once, in order, and return their ids: all of them or, if any
        is refused, none (every edit is checked before the store changes).

        Args:
            tensors: one {name: tensor} per edit (as `add`).
            infos: one description per edit (None: no descriptions).
            edit_ids: one id (or None for the next int) per edit (None: all next ints).

        Raises:
            ValueError: as `add`, naming the edit; an id given twice; lists of other lengths.
        """
        n = len(tensors)
        infos = [None] * n if infos is None else list(infos)
        edit_ids = [None] * n if edit_ids is None else list(edit_ids)
        if len(infos) != n or len(edit_ids) != n:
            raise ValueError(
                f"add_many: {n} edits, {len(infos)} infos and {len(edit_ids)} ids"
            )
        rows, ids, next_id, taken = [], [], self._next_id, set()
        for given_id, row_tensors, info in zip(edit_ids, tensors, infos, strict=True):
            if given_id is None:
                edit_id, next_id = next_id, next_id + 1
            else:
                edit_id = self.new_id(given_id)
                if isinstance(edit_id, int):
                    next_id = max(next_id, edit_id + 1)
            if edit_id in taken:
                raise ValueError(f"edit id {edit_id!r} is given twice")
            taken.add(edit_id)
            row = self._checked_row(edit_id, row_tensors)
            rows.append((row, self._checked_info(edit_id, info)))
            ids.append(edit_id)
        for edit_id, (row, info) in zip(ids, rows, strict=True):
            self._append(edit_id, row, info)
        self._cache.clear()
        return ids

    def _checked_row(
        self, edit_id: EditId, tensors: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        names = set(tensors)
        if names != set(self.fields):
            raise ValueError(
                f"edit {edit_id!r}: missing tensor(s) {sorted(set(self.fields) - names)}, "
                f"unexpected {sorted(names - set(self.fields))}"
            )
        kept: dict[tuple, torch.Tensor] = {}  # a tensor given under two names stays shared
        row = {}
        for name, field in self.fields.items():
            given = tensors[name]
            self._check_shape(field, given.shape, f"edit {edit_id!r}: tensor {name!r}")
            if (id(given), field.dtype) not in kept:
                device = self.device if self.device is not None else given.device
                kept[id(given), field.dtype] = given.detach().to(device=device, dtype=field.dtype)
            row[name] = kept[id(given), field.dtype]
        return row

    @staticmethod
    def _checked_info(edit_id: EditId, info: Mapping[str, Any] | None) -> dict[str, Any]:
        info = dict(info or {})
        try:
            json.dumps(info)
        except (TypeError, ValueError) as error:
            raise ValueError(f"edit {edit_id!r}: info is not JSON-able ({error})") from error
        return info

    def remove(self, edit_id: EditId) -> None:
        """Forget one edit; the others keep their order (KeyError naming the id if none)."""
        i = self.position(edit_id)
        for column in (self._ids, self._info, *self._columns.values()):
            del column[i]
        self._position = {eid: p for p, eid in enumerate(self._ids)}
        self._cache.clear()

    def clear(self) -> None:
        """Forget every edit. Int ids keep counting up, so an old id never names a new edit."""
        for column in (self._ids, self._info, *self._columns.values()):
            column.clear()
        self._position.clear()
        self._cache.clear()

    # -- reading ------------------------------------------------------------------------------

    def info(self, edit_id: EditId) -> dict[str, Any]:
        """A copy of the info dict of one edit."""
        return dict(self._info[self.position(edit_id)])

    def tensors(self, name: str, positions: Iterable[int] | None = None) -> list[torch.Tensor]:
        """The tensors of `name` of every edit in insertion order, or of the edits at
        `positions` (in that order; repeats allowed). Rows of a lazily read store are read
        here, the first time (ValueError naming the file: a damaged block)."""
        column = self._column(name)
        chosen = column if positions is None else [column[p] for p in positions]
        return [materialize(t) for t in chosen]

    def lengths(self, name: str) -> list[int]:
        """Rows of `name` per edit in insertion order (1 for a vector), without reading a lazily
        read store's rows."""
        column = self._column(name)
        return [int(t.shape[0]) if self.fields[name].sequence else 1 for t in column]

    def nbytes(self, edit_id: EditId) -> int:
        """Bytes of one edit's tensors (a tensor held under two names counted once; unread rows
        of a lazily read store counted as they will be held)."""
        i = self.position(edit_id)
        unique = {id(column[i]): column[i] for column in self._columns.values()}
        return sum(t.numel() * t.element_size() for t in unique.values())

    def clear_cache(self) -> None:
        """Drop the values computed from the edits (`cached`), e.g. when how they are compared
        changed."""
        self._cache.clear()

    def cached(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """`build()`, computed once and kept until the next change of the edits (for a method's
        own matrices; use a key that names the method, e.g. ("gate", kind, device))."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def stacked(
        self, name: str, device: torch.device | str | None = None, *, cache: bool = True
    ) -> torch.Tensor:
        """The vectors of `name` of all edits as one [n_edits, width] matrix.

        Args:
            name: a vector field (not a sequence).
            device: where (None: where the first edit's vector is).
            cache: keep it until the next change (per device; one built under
                `torch.inference_mode` is kept apart, since it cannot serve autograd).
        """
        field, column = self._vector(name), self._columns[name]
        if device is None:
            device = column[0].device if column else (self.device or torch.device("cpu"))
        device = torch.device(device)

        def build() -> torch.Tensor:
            if not column:
                return torch.zeros((0, field.width), dtype=empty_dtype(field), device=device)
            return torch.stack([materialize(t).to(device) for t in column])  # [n_edits, width]

        if not cache:
            return build()
        return self.cached(("stacked", name, device, torch.is_inference_mode_enabled()), build)

    def cosine(self, queries: torch.Tensor, name: str) -> torch.Tensor:
        """Cosine similarity of each query to each stored vector of `name`: [batch, width] ->
        [batch, n_edits] float32, on the queries' device (zero rows have similarity 0)."""
        if not self._ids:
            raise ValueError(f"similarity lookup in an empty edit store (field {name!r})")
        width = self._vector(name).width
        if queries.dim() != 2 or queries.shape[1] != width:
            raise ValueError(
                f"queries for {name!r} have shape {tuple(queries.shape)}, expected [batch, {width}]"
            )
        device = queries.device
        unit = self.cached(
            ("unit", name, device, torch.is_inference_mode_enabled()),
            lambda: F.normalize(self.stacked(name, device, cache=False).float(), dim=-1),
        )  # [n_edits, width], unit rows
        return F.normalize(queries.float(), dim=-1) @ unit.T  # [batch, n_edits]

    def nearest(self, queries: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The most similar stored edit (cosine over `name`) per query: positions [batch] long
        (indices into `ids`), similarity [batch] float32. ValueError: the store is empty,
        `name` is not a vector field, or the queries have another width."""
        return argmax_rows(self.cosine(queries, name))

    def top_k(
        self, queries: torch.Tensor, name: str, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most similar stored edits per query, best first: positions [batch, k] long and
        similarity [batch, k] float32 (k capped at the number of edits)."""
        return top_k_rows(self.cosine(queries, name), k)

    # -- helpers ------------------------------------------------------------------------------

    def _append(self, edit_id: EditId, row: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        self._position[edit_id] = len(self._ids)
        self._ids.append(edit_id)
        for name, tensor in row.items():
            self._columns[name].append(tensor)
        self._info.append(info)
        if isinstance(edit_id, int):
            self._next_id = max(self._next_id, edit_id + 1)

    def _column(self, name: str) -> list[torch.Tensor]:
        if name not in self._columns:
            raise KeyError(f"no field {name!r} in the store (fields: {list(self.fields)})")
        return self._columns[name]

    def _vector(self, name: str) -> Field:
        field = self.fields.get(name)
        if field is None or field.sequence:
            raise ValueError(f"{name!r} is not a vector field (fields: {list(self.fields)})")
        return field

    def _sequences(self) -> list[str]:
        return [name for name, field in self.fields.items() if field.sequence]

    def _index_fields(self) -> set[str]:
        return {*STORE_FIELDS, *(f"{name}_lengths" for name in self._sequences())}

    @staticmethod
    def _check_shape(field: Field, shape: torch.Size, what: str) -> None:
        if field.sequence:
            if len(shape) != 2 or shape[0] == 0 or shape[1] != field.width:
                raise ValueError(
                    f"{what} has shape {tuple(shape)}, expected [rows > 0, {field.width}]"
                )
        elif tuple(shape) != (field.width,):
            raise ValueError(f"{what} has shape {tuple(shape)}, expected ({field.width},)")
