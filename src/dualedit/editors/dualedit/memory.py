"""The edit memory: the stored states of many edits, and the nearest-edit lookup of the gate.

Per edit: the text layer's output on the edit sample (image, prompt + target) at the positions
the text adapter attends to (all of them, or the non-image ones with `text_keys="text"`), the
visual layer's output at all of its positions, padding trimmed, and the gate key parts, read at
the text layer (keys.py): "prompt_end" (the edit prompt's last prompt token), "last_position"
(the last position of prompt + target, the released code's key) and "image_mean". Keeping every
part makes the gate key a run-time choice. Lookup is one matrix product of the input gate vectors
with the stacked edit gate vectors, so thousands of edits cost one small GEMM per forward.

Files: `memory.safetensors` (states of all edits concatenated along positions, and the keys) and
`memory.json` (ids, lengths, descriptions, and what the states belong to), written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dualedit.editors.base import EditId
from dualedit.editors.base import EditInfo as BaseEditInfo
from dualedit.editors.dualedit.config import TEXT_KEYS
from dualedit.editors.dualedit.keys import (
    KEY_PARTS,
    KIND_PARTS,
    REQUIRED_PARTS,
    gate_vectors,
    part_width,
    similarity_matrix,
)
from dualedit.io import atomic_save_safetensors, atomic_write_text

logger = logging.getLogger(__name__)

MEMORY_FORMAT = 3
# Format 1: no "text_keys" (always "all") and no "image_mean" key part; format 2: no
# "image_groups" key part. Parts a file lacks are unknown (NaN) for its edits.
READABLE_FORMATS = (1, 2, 3)
PART_SINCE_FORMAT = {"image_mean": 2, "image_groups": 3}
STATES_FILE = "memory.safetensors"
INDEX_FILE = "memory.json"
MAX_ID_LENGTH = 64


@dataclass(frozen=True)
class EditInfo(BaseEditInfo):
    """What `EditMemory.entries` reports about one stored edit.

    Attributes:
        id: the edit's id (an int given by the memory, or the caller's short string).
        prompt, target, image: the edit sample as described by whoever added it (may be None).
        text_positions, visual_positions: how many positions of states are kept per layer.
        nbytes: bytes kept for this edit (states and keys).
    """

    text_positions: int
    visual_positions: int
    nbytes: int


@dataclass
class EditStates:
    """The states of one edit per input of a batch, padded to the longest edit.

    Attributes:
        text: [batch, m_text, hidden] text-layer states; text_mask [batch, m_text] bool.
        visual: [batch, m_visual, hidden] visual-layer states; visual_mask [batch, m_visual] bool.
        keys: {part: [batch, width] float32} gate key parts of the edits (keys.KEY_PARTS).
    """

    text: torch.Tensor
    text_mask: torch.Tensor
    visual: torch.Tensor
    visual_mask: torch.Tensor
    keys: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.text.shape[0]

    def select(self, rows: torch.Tensor) -> EditStates:
        """The edits of `rows` ([k] long), in that order."""
        return EditStates(
            text=self.text.index_select(0, rows),
            text_mask=self.text_mask.index_select(0, rows),
            visual=self.visual.index_select(0, rows),
            visual_mask=self.visual_mask.index_select(0, rows),
            keys={kind: key.index_select(0, rows) for kind, key in self.keys.items()},
        )


def pad_states(
    states: Sequence[torch.Tensor], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of [m_i, hidden] tensors: -> ([n, max m, hidden], mask [n, max m])."""
    width = max(s.shape[0] for s in states)
    hidden = states[0].shape[1]
    device = device if device is not None else states[0].device
    padded = states[0].new_zeros((len(states), width, hidden), device=device)  # [n, m, hidden]
    mask = torch.zeros((len(states), width), dtype=torch.bool, device=device)  # [n, m]
    for i, s in enumerate(states):
        padded[i, : s.shape[0]] = s.to(device)
        mask[i, : s.shape[0]] = True
    return padded, mask


class EditMemory:
    """Stored edits of one model, in insertion order, addressed by stable ids.

    Args:
        hidden_size: width of the stored states.
        text_layer, visual_layer: the decoder layers the states come from.
        model_type: the model's `config.model_type` (checked when a memory file is loaded).
        text_keys: which edit positions the text states hold ("all" or "text", see
            `DualEditConfig.text_keys`; checked when a memory file is loaded).
        device: where states are kept (None: where they are given). Keys follow the queries.

    Example:
        >>> memory = EditMemory(4096, text_layer=16, visual_layer=19, model_type="llava")
        >>> eid = memory.add(h_text, h_visual, {"prompt_end": k1, "last_position": k2,
        ...                                     "image_mean": k3})
        >>> positions, similarity = memory.lookup(input_keys, "prompt_end")
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        text_layer: int,
        visual_layer: int,
        model_type: str,
        text_keys: str = "all",
        device: torch.device | str | None = None,
    ):
        if text_keys not in TEXT_KEYS:
            raise ValueError(f"EditMemory: text_keys must be one of {TEXT_KEYS}, got {text_keys!r}")
        self.text_keys = text_keys
        self.hidden_size = int(hidden_size)
        self.text_layer = int(text_layer)
        self.visual_layer = int(visual_layer)
        self.model_type = str(model_type)
        self.device = torch.device(device) if device is not None else None
        self._ids: list[EditId] = []
        self._text: list[torch.Tensor] = []  # each [m, hidden]
        self._visual: list[torch.Tensor] = []  # each [m, hidden]
        self._keys: dict[str, list[torch.Tensor]] = {part: [] for part in KEY_PARTS}  # [hidden]
        self._info: list[dict[str, Any]] = []
        self._position: dict[EditId, int] = {}
        self._next_id = 0
        # Normalised stacked keys per (kind, device, inference mode), rebuilt after any change.
        self._key_cache: dict[tuple[str, torch.device, bool], torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"EditMemory({len(self)} edits, hidden_size={self.hidden_size}, "
            f"layers=({self.text_layer}, {self.visual_layer}), model_type={self.model_type!r})"
        )

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, edit_id: object) -> bool:
        return edit_id in self._position

    @property
    def ids(self) -> list[EditId]:
        """Ids in insertion order (the order of `lookup` positions)."""
        return list(self._ids)

    # -- adding and removing ------------------------------------------------------------------

    def add(
        self,
        text: torch.Tensor,
        visual: torch.Tensor,
        keys: dict[str, torch.Tensor],
        *,
        edit_id: EditId | None = None,
        prompt: str | None = None,
        target: str | None = None,
        image: str | None = None,
    ) -> EditId:
        """Store one edit and return its id.

        Args:
            text: [m, hidden] text-layer states of the edit sample (padding already trimmed).
            visual: [m, hidden] visual-layer states (may be the same tensor when the layers agree).
            keys: {part: [width]} gate key parts (keys.KEY_PARTS, width = hidden size times
                `keys.part_width`); those of keys.REQUIRED_PARTS at least, the others are
                unknown (NaN) when not given and the key kinds built from them refuse this edit.
            edit_id: a short string id (<= 64 characters) or None for the next int id.
            prompt, target, image: description kept for `list` and saved with the memory.

        Raises:
            ValueError: a wrong shape, a missing key kind, or an id already in use.
        """
        edit_id = self._new_id(edit_id)
        shared = visual is text
        text = self._check_states("text", text, edit_id)
        visual = text if shared else self._check_states("visual", visual, edit_id)
        missing = sorted(set(REQUIRED_PARTS) - set(keys))
        if missing:
            raise ValueError(f"edit {edit_id!r}: missing gate key(s) {missing}")
        checked = {}
        for kind in KEY_PARTS:
            width = self.hidden_size * part_width(kind)
            key = keys.get(kind)
            if key is None:
                key = torch.full((width,), float("nan"), device=keys["prompt_end"].device)
            if key.shape != (width,):
                raise ValueError(
                    f"edit {edit_id!r}: gate key {kind!r} has shape {tuple(key.shape)}, "
                    f"expected ({width},)"
                )
            checked[kind] = key.detach().float().to(self._store_device(key))
        self._position[edit_id] = len(self._ids)
        self._ids.append(edit_id)
        self._text.append(text)
        self._visual.append(visual)
        for kind in KEY_PARTS:
            self._keys[kind].append(checked[kind])
        self._info.append({"prompt": prompt, "target": target, "image": image})
        if isinstance(edit_id, int):
            self._next_id = max(self._next_id, edit_id + 1)
        self._key_cache.clear()
        return edit_id

    def remove(self, edit_id: EditId) -> None:
        """Forget one edit.

        Raises:
            KeyError: no edit with this id.
        """
        if edit_id not in self._position:
            raise KeyError(f"no edit with id {edit_id!r} in the memory ({len(self)} edits)")
        i = self._position[edit_id]
        for store in (self._ids, self._text, self._visual, self._info, *self._keys.values()):
            del store[i]
        self._position = {eid: p for p, eid in enumerate(self._ids)}
        self._key_cache.clear()

    def clear(self) -> None:
        """Forget every edit. Ids keep counting up, so an old id never names a new edit."""
        for store in (self._ids, self._text, self._visual, self._info, *self._keys.values()):
            store.clear()
        self._position.clear()
        self._key_cache.clear()

    # -- reading ------------------------------------------------------------------------------

    def nbytes(self, edit_id: EditId) -> int:
        """Bytes kept for one edit (states counted once when both layers share them, and keys)."""
        i = self._position[edit_id]
        tensors = [self._text[i], self._visual[i]] + [self._keys[k][i] for k in KEY_PARTS]
        unique = {id(t): t for t in tensors}
        return sum(t.numel() * t.element_size() for t in unique.values())

    def total_bytes(self) -> int:
        return sum(self.nbytes(edit_id) for edit_id in self._ids)

    def entries(self) -> list[EditInfo]:
        """One `EditInfo` per stored edit, in insertion order."""
        return [
            EditInfo(
                id=edit_id,
                prompt=info["prompt"],
                target=info["target"],
                image=info["image"],
                text_positions=int(self._text[i].shape[0]),
                visual_positions=int(self._visual[i].shape[0]),
                nbytes=self.nbytes(edit_id),
            )
            for i, (edit_id, info) in enumerate(zip(self._ids, self._info, strict=True))
        ]

    def lookup(self, keys: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The most similar stored edit for each input key (cosine; for a min kind such as
        "prompt_end_and_image", the smaller of the part cosines, see `keys.similarity_matrix`).

        Args:
            keys: [batch, d] input gate vectors of `kind` (`keys.gate_vectors`; a raw
                single-part key does too), any dtype and device; rows are normalised here.
            kind: a gate key kind (`DualEditConfig.gate_key`): which stored vectors to compare with.

        Returns:
            positions [batch] long (indices into `ids`), similarity [batch] float32.

        Raises:
            ValueError: the memory is empty, or an unknown key kind.
        """
        if not self._ids:
            raise ValueError("lookup in an empty edit memory")
        matrix = self.key_matrix(kind, keys.device)  # [n_edits, d], unit rows (or parts)
        similarity = similarity_matrix(keys, matrix, kind)  # [batch, n_edits]
        best, positions = similarity.max(dim=-1)  # [batch], [batch]
        return positions, best

    def key_matrix(self, kind: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The stacked gate vectors of `kind` of the stored edits: [n_edits, d] float32.

        Raises:
            ValueError: an unknown kind, or edits that lack a part the kind needs.
        """
        device = torch.device(device) if device is not None else self._keys["prompt_end"][0].device
        # A matrix built under inference_mode is an inference tensor: cache the two apart.
        cache_key = (kind, device, torch.is_inference_mode_enabled())
        cached = self._key_cache.get(cache_key)
        if cached is None:
            parts = {
                part: torch.stack([k.to(device) for k in self._keys[part]])  # [n, width]
                for part in KIND_PARTS.get(kind, ())
            }
            cached = gate_vectors(parts, kind)  # [n, d]
            self._key_cache[cache_key] = cached
        return cached

    def states(
        self, positions: torch.Tensor | Sequence[int], device: torch.device | str | None = None
    ) -> EditStates:
        """The padded states and keys of the edits at `positions` (one per input row)."""
        rows = [int(p) for p in (positions.tolist() if torch.is_tensor(positions) else positions)]
        if not rows:
            raise ValueError("states() needs at least one position")
        text, text_mask = pad_states([self._text[p] for p in rows], device)
        visual, visual_mask = pad_states([self._visual[p] for p in rows], device)
        keys = {
            kind: torch.stack([self._keys[kind][p] for p in rows]).to(text.device)
            for kind in KEY_PARTS
        }
        return EditStates(text, text_mask, visual, visual_mask, keys)

    # -- files --------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `memory.safetensors` and `memory.json` under `directory` (atomically each).

        Returns:
            The directory.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dtype = self._text[0].dtype if self._text else torch.float32
        empty = torch.zeros((0, self.hidden_size), dtype=dtype)
        tensors = {
            "text": torch.cat([t.cpu() for t in self._text]) if self._text else empty,
            "visual": torch.cat([t.cpu() for t in self._visual]) if self._visual else empty,
        }
        for kind in KEY_PARTS:
            tensors[f"key.{kind}"] = (
                torch.stack([k.cpu() for k in self._keys[kind]])
                if self._ids
                else torch.zeros((0, self.hidden_size * part_width(kind)))
            )
        tensors = {name: t.contiguous() for name, t in tensors.items()}
        index = {
            "format": MEMORY_FORMAT,
            "hidden_size": self.hidden_size,
            "text_layer": self.text_layer,
            "visual_layer": self.visual_layer,
            "model_type": self.model_type,
            "text_keys": self.text_keys,
            "next_id": self._next_id,
            "ids": self._ids,
            "text_lengths": [int(t.shape[0]) for t in self._text],
            "visual_lengths": [int(t.shape[0]) for t in self._visual],
            "info": self._info,
        }
        atomic_save_safetensors(tensors, directory / STATES_FILE)
        atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True))
        logger.info("saved %d edits (%d bytes) to %s", len(self), self.total_bytes(), directory)
        return directory

    @classmethod
    def load(
        cls, directory: str | os.PathLike, *, device: torch.device | str | None = None
    ) -> EditMemory:
        """A new memory with the edits saved in `directory` by `save`.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: the files are malformed or disagree with each other.
        """
        index = _read_index(Path(directory) / INDEX_FILE)
        memory = cls(
            index["hidden_size"],
            text_layer=index["text_layer"],
            visual_layer=index["visual_layer"],
            model_type=index["model_type"],
            text_keys=index["text_keys"],
            device=device,
        )
        memory.read(directory)
        return memory

    def read(self, directory: str | os.PathLike) -> None:
        """Replace this memory's edits by those saved in `directory`.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: the files are malformed, or were saved for another hidden size, other
                layers or another model type than this memory's (the message names which).
        """
        directory = Path(directory)
        index_path, states_path = directory / INDEX_FILE, directory / STATES_FILE
        index = _read_index(index_path)
        for name in ("hidden_size", "text_layer", "visual_layer", "model_type", "text_keys"):
            if index[name] != getattr(self, name):
                raise ValueError(
                    f"{index_path}: {name} is {index[name]!r}, this memory needs "
                    f"{getattr(self, name)!r}"
                )
        if not states_path.is_file():
            raise FileNotFoundError(f"edit memory file {states_path} not found")
        tensors = load_file(str(states_path))
        wanted = {"text", "visual"} | {f"key.{kind}" for kind in KEY_PARTS}
        for part, since in PART_SINCE_FORMAT.items():
            if index["format"] < since and f"key.{part}" not in tensors:
                # Unknown for edits stored before the part existed: NaN, refused by gate_vectors.
                rows = tensors["key.prompt_end"].shape[0]
                width = self.hidden_size * part_width(part)
                tensors[f"key.{part}"] = torch.full((rows, width), float("nan"))
        if set(tensors) != wanted:
            raise ValueError(
                f"{states_path}: missing {sorted(wanted - set(tensors))}, "
                f"unexpected {sorted(set(tensors) - wanted)}"
            )
        ids, info = index["ids"], index["info"]
        lengths = {"text": index["text_lengths"], "visual": index["visual_lengths"]}
        n = len(ids)
        if len(set(map(repr, ids))) != n or {len(info), *map(len, lengths.values())} != {n}:
            raise ValueError(f"{index_path}: ids, text_lengths, visual_lengths and info disagree")
        for name, counts in lengths.items():
            if tensors[name].shape[0] != sum(counts):
                raise ValueError(
                    f"{states_path}: {name} has {tensors[name].shape[0]} positions, "
                    f"{index_path} lists {sum(counts)}"
                )
        texts = torch.split(tensors["text"], lengths["text"]) if n else ()
        visuals = torch.split(tensors["visual"], lengths["visual"]) if n else ()
        self.clear()
        for i, edit_id in enumerate(ids):
            text = texts[i].clone()
            same = self.text_layer == self.visual_layer and torch.equal(visuals[i], texts[i])
            self.add(
                text,
                text if same else visuals[i].clone(),
                {kind: tensors[f"key.{kind}"][i] for kind in KEY_PARTS},
                edit_id=edit_id,
                prompt=info[i].get("prompt"),
                target=info[i].get("target"),
                image=info[i].get("image"),
            )
        self._next_id = max(self._next_id, int(index["next_id"]))

    # -- helpers ------------------------------------------------------------------------------

    def _new_id(self, edit_id: EditId | None) -> EditId:
        if edit_id is None:
            edit_id = self._next_id
            while edit_id in self._position:
                edit_id += 1
            return edit_id
        if isinstance(edit_id, bool) or not isinstance(edit_id, (int, str)):
            raise ValueError(f"edit id must be an int or a str, got {edit_id!r}")
        if isinstance(edit_id, str) and not 0 < len(edit_id) <= MAX_ID_LENGTH:
            raise ValueError(f"edit id must have 1..{MAX_ID_LENGTH} characters, got {edit_id!r}")
        if edit_id in self._position:
            raise ValueError(f"edit id {edit_id!r} is already in the memory")
        return edit_id

    def _check_states(self, name: str, states: torch.Tensor, edit_id: EditId) -> torch.Tensor:
        if states.dim() != 2 or states.shape[1] != self.hidden_size or states.shape[0] == 0:
            raise ValueError(
                f"edit {edit_id!r}: {name} states have shape {tuple(states.shape)}, expected "
                f"[positions > 0, {self.hidden_size}]"
            )
        return states.detach().to(self._store_device(states))

    def _store_device(self, tensor: torch.Tensor) -> torch.device:
        return self.device if self.device is not None else tensor.device


def _read_index(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"edit memory file {path} not found")
    index = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(index, dict) or index.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path}: not an edit memory index of format {READABLE_FORMATS}")
    if index["format"] == 1:
        index.setdefault("text_keys", "all")  # format 1 always stored every position
    required = (
        "hidden_size",
        "text_layer",
        "visual_layer",
        "model_type",
        "next_id",
        "ids",
        "text_lengths",
        "visual_lengths",
        "info",
    )
    missing = [name for name in required if name not in index]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}")
    return index
