"""The edit memory: the stored states of many edits, and the nearest-edit lookup of the gate.

Per edit: the text layer's output on the edit sample (image, prompt + target) at the positions
the text adapter attends to (all of them, or the non-image ones with `text_keys="text"`), the
visual layer's output at all of its positions, padding trimmed, and the gate key parts, read at
the text layer (keys.py): "prompt_end" (the edit prompt's last prompt token), "last_position"
(the last position of prompt + target, the released code's key) and "image_mean". Keeping every
part makes the gate key a run-time choice. Lookup is one matrix product of the input gate vectors
with the stacked edit gate vectors, so thousands of edits cost one small GEMM per forward.

Ids, per-edit tensors and files are the shared `editors.memory.EditStore`; this module adds
what is DualEdit's: the two layers' states, the key parts, the gate key kinds
(`keys.similarity_matrix`) and the memory files' meta and older formats. Files:
`memory.safetensors` (states of all edits concatenated along positions, and the keys) and
`memory.json` (ids, lengths, descriptions, and what the states belong to), written atomically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dualedit.editors.base import EditId
from dualedit.editors.base import EditInfo as BaseEditInfo
from dualedit.editors.dualedit.config import TEXT_KEYS
from dualedit.editors.dualedit.memory_index import (  # noqa: F401  (re-exported)
    MODEL_FIELDS,
    READABLE_FORMATS,
    check_index,
    check_lengths,
)
from dualedit.editors.dualedit.gate import (
    KEY_PARTS,
    kind_parts,
    REQUIRED_PARTS,
    compact,
    gate_vectors,
    key_parts,
    lookup_matrix,
    lookup_similarity,
    part_width,
    text_key_positions,
)
from dualedit.editors.memory import MAX_ID_LENGTH  # noqa: F401  (re-exported)
from dualedit.editors.memory import EditStore, Field, argmax_rows
from dualedit.folders import FolderWriter

logger = logging.getLogger(__name__)

MEMORY_FORMAT = 5
# Format 1: no "text_keys" (always "all") and no "image_mean" key part; format 2: no
# "image_groups" key part; format 3: no checksums; format 4: text and visual states always
# written apart (format 5 writes states shared by both once, `same_as`). Parts a file lacks are
# unknown (NaN) for its edits.
PART_SINCE_FORMAT = {"image_mean": 2, "image_groups": 3}
STATES_FILE = "memory.safetensors"
INDEX_FILE = "memory.json"


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


def edit_states(
    text_out: torch.Tensor,
    visual_out: torch.Tensor,
    attention_mask: torch.Tensor,
    image_mask: torch.Tensor,
    prompt_end: torch.Tensor,
    text_keys: str,
) -> EditStates:
    """What an edit stores, read from the frozen model's outputs on n right-padded edit samples
    (image, prompt + target): the text layer's states at the positions the text adapter attends
    to (`text_keys`), the visual layer's states at every position, and the gate key parts at the
    text layer. The one definition behind applying an edit (`DualEditor`) and training
    (`losses.edit_states_from_prefix`).

    Args:
        text_out: [n, seq, hidden] the text layer's output; visual_out: the visual layer's.
        attention_mask, image_mask: [n, seq]; prompt_end: [n] each sample's last prompt token.
        text_keys: "all", "text" or "answer" (`DualEditConfig.text_keys`).
    """
    mask = attention_mask.bool()  # [n, seq]
    image_mask = image_mask.to(text_out.device).bool() & mask  # [n, seq]
    last = (attention_mask.sum(dim=1) - 1).to(text_out.device)  # [n], last non-pad position
    keys = key_parts(text_out, prompt_end, last, image_mask)  # {part: [n, width]}
    if text_keys == "all":
        text, text_mask = text_out, mask
    else:
        keep = text_key_positions(mask, image_mask, prompt_end, text_keys)  # [n, seq]
        text, text_mask = compact(text_out, keep)  # [n, n_text, hidden], [n, n_text]
    return EditStates(text, text_mask, visual_out, mask, keys)


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
        states = Field(self.hidden_size, sequence=True)  # [positions, hidden], dtype as given
        keys = {
            f"key.{part}": Field(self.hidden_size * part_width(part), dtype=torch.float32)
            for part in KEY_PARTS
        }  # the names and order of the tensors in memory.safetensors
        self._store = EditStore({"text": states, "visual": states, **keys}, device=self.device)
        #: The "learned" gate key's fitted heads (`set_gate_heads`), None otherwise.
        self.gate_heads: Any = None

    def __repr__(self) -> str:
        return (
            f"EditMemory({len(self)} edits, hidden_size={self.hidden_size}, "
            f"layers=({self.text_layer}, {self.visual_layer}), model_type={self.model_type!r})"
        )

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, edit_id: object) -> bool:
        return edit_id in self._store

    @property
    def ids(self) -> list[EditId]:
        """Ids in insertion order (the order of `lookup` positions)."""
        return self._store.ids

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
        return self.add_many(
            [text], [visual], [keys], edit_ids=[edit_id], prompts=[prompt], targets=[target],
            images=[image],
        )[0]

    def add_many(
        self,
        texts: Sequence[torch.Tensor],
        visuals: Sequence[torch.Tensor],
        keys: Sequence[dict[str, torch.Tensor]],
        *,
        edit_ids: Sequence[EditId | None] | None = None,
        prompts: Sequence[str | None] | None = None,
        targets: Sequence[str | None] | None = None,
        images: Sequence[str | None] | None = None,
    ) -> list[EditId]:
        """Store several edits at once (each as `add`), in order; returns their ids. Every edit
        is checked first: one refused edit stores none of them.

        Raises:
            ValueError: lists of different lengths, or as `add`, naming the edit.
        """
        n = len(texts)
        lists = {"visuals": visuals, "keys": keys, "edit_ids": edit_ids, "prompts": prompts,
                 "targets": targets, "images": images}
        wrong = {name: len(v) for name, v in lists.items() if v is not None and len(v) != n}
        if wrong:
            raise ValueError(f"add_many: {n} text states but {wrong}")
        edit_ids = [None] * n if edit_ids is None else list(edit_ids)
        rows, infos, provisional = [], [], self._store.new_id(None)
        for i in range(n):
            label = edit_ids[i]
            if label is None:  # the id the store will give (named in messages)
                label, provisional = provisional, provisional + 1
            rows.append(self._checked(texts[i], visuals[i], keys[i], label))
            infos.append({field: None if values is None else values[i]
                          for field, values in (("prompt", prompts), ("target", targets),
                                                ("image", images))})
        # one tensor given for both layers is kept once
        return self._store.add_many(rows, infos, edit_ids=edit_ids)

    def _checked(
        self, text: torch.Tensor, visual: torch.Tensor, keys: dict[str, torch.Tensor],
        edit_id: EditId,
    ) -> dict[str, torch.Tensor]:
        """One edit's tensors by store field name, checked (ValueError naming `edit_id`)."""
        for name, states in (("text", text), ("visual", visual)):
            if states.dim() != 2 or states.shape[1] != self.hidden_size or states.shape[0] == 0:
                raise ValueError(
                    f"edit {edit_id!r}: {name} states have shape {tuple(states.shape)}, "
                    f"expected [positions > 0, {self.hidden_size}]"
                )
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
            checked[f"key.{kind}"] = key
        return {"text": text, "visual": visual, **checked}

    def remove(self, edit_id: EditId) -> None:
        """Forget one edit (KeyError: no edit with this id)."""
        self._store.remove(edit_id)

    def clear(self) -> None:
        """Forget every edit. Ids keep counting up, so an old id never names a new edit."""
        self._store.clear()

    # -- reading ------------------------------------------------------------------------------

    def nbytes(self, edit_id: EditId) -> int:
        """Bytes kept for one edit (states counted once when both layers share them, and keys)."""
        return self._store.nbytes(edit_id)

    def total_bytes(self) -> int:
        return sum(self._store.nbytes(edit_id) for edit_id in self._store.ids)

    def entries(self) -> list[EditInfo]:
        """One `EditInfo` per stored edit, in insertion order."""
        store = self._store
        return [
            EditInfo(
                id=edit_id,
                prompt=(info := store.info(edit_id))["prompt"],
                target=info["target"],
                image=info["image"],
                text_positions=text,
                visual_positions=visual,
                nbytes=store.nbytes(edit_id),
            )
            for edit_id, text, visual in zip(
                store.ids, store.lengths("text"), store.lengths("visual"), strict=True
            )
        ]

    def lookup(self, keys: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The most similar stored edit for each input key (cosine; for a min kind such as
        "prompt_end_and_image", the smaller of the part cosines, see `keys.similarity_matrix`).

        Args:
            keys: [batch, d] input gate vectors of `kind` (`keys.gate_vectors`; a raw
                single-part key does too), any dtype and device; rows are normalised here.
            kind: a gate key kind (`DualEditConfig.gate_key`): which stored vectors to compare with.

        Returns:
            positions [batch] long (indices into `ids`), similarity [batch] float32
            (ValueError: the memory is empty, or an unknown key kind).
        """
        if not len(self._store):
            raise ValueError("lookup in an empty edit memory")
        device = keys.device
        # Only the transposed form is kept for lookups (no second copy of the key matrix).
        matrix = self._store.cached(
            ("gate-lookup", kind, device, torch.is_inference_mode_enabled()),
            lambda: lookup_matrix(self._build_key_matrix(kind, device), kind),
        )  # [d, n_edits], unit columns (or parts)
        return argmax_rows(lookup_similarity(keys, matrix, kind))  # of [batch, n_edits]

    def key_matrix(self, kind: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The stacked gate vectors of `kind` of the stored edits: [n_edits, d] float32.

        Raises:
            ValueError: an unknown kind, or edits that lack a part the kind needs.
        """
        device = torch.device(device) if device is not None else None
        # A matrix built under inference_mode is an inference tensor: cache the two apart
        # (set_gate_heads drops every cached matrix).
        return self._store.cached(
            ("gate", kind, device, torch.is_inference_mode_enabled()),
            lambda: self._build_key_matrix(kind, device),
        )

    def _build_key_matrix(self, kind: str, device: torch.device | None) -> torch.Tensor:
        """`key_matrix` without the cache: [n_edits, d] float32."""
        parts = {  # [n_edits, width] each; only the gate matrix is kept
            part: self._store.stacked(f"key.{part}", device, cache=False)
            for part in kind_parts(kind)
        }
        heads = self.gate_heads
        if heads is not None:
            parts = {k: v.to(heads.threshold.device) for k, v in parts.items()}
        vectors = gate_vectors(parts, kind, heads)  # [n_edits, d]
        return vectors if device is None else vectors.to(device)

    def set_gate_heads(self, heads: Any) -> None:
        """The fitted heads of the "learned" gate key (`heads.GateHeads`, or None)."""
        self.gate_heads = heads
        self._store.clear_cache()

    def states(
        self, positions: torch.Tensor | Sequence[int], device: torch.device | str | None = None
    ) -> EditStates:
        """The padded states and keys of the edits at `positions` (one per input row)."""
        rows = [int(p) for p in (positions.tolist() if torch.is_tensor(positions) else positions)]
        if not rows:
            raise ValueError("states() needs at least one position")
        text, text_mask = pad_states(self._store.tensors("text", rows), device)
        visual, visual_mask = pad_states(self._store.tensors("visual", rows), device)
        keys = {
            kind: torch.stack(self._store.tensors(f"key.{kind}", rows)).to(text.device)
            for kind in KEY_PARTS
        }
        return EditStates(text, text_mask, visual, visual_mask, keys)

    # -- files --------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `memory.safetensors` and `memory.json` to `directory` as a whole (other files
        of the folder are kept; see `EditStore.save`); returns the directory."""
        directory = self._store.save(
            directory, index_file=INDEX_FILE, tensors_file=STATES_FILE, meta=self._meta()
        )
        logger.info("saved %d edits (%d bytes) to %s", len(self), self.total_bytes(), directory)
        return directory

    def write(self, writer: FolderWriter) -> list[str]:
        """Write the memory files into a folder being written (an editor folder)."""
        return self._store.write(
            writer, index_file=INDEX_FILE, tensors_file=STATES_FILE, meta=self._meta()
        )

    @classmethod
    def load(
        cls, directory: str | os.PathLike, *, device: torch.device | str | None = None,
        lazy: bool | None = None,
    ) -> EditMemory:
        """A new memory with the edits saved in `directory` by `save` (FileNotFoundError: a file
        is missing; ValueError: the files are malformed, damaged or disagree). A large memory
        is memory-mapped: its states are read and verified per edit on first use (`lazy`, see
        `EditStore.read_files`)."""
        directory = Path(directory)
        index, tensors, _ = EditStore.read_files(
            directory, index_file=INDEX_FILE, tensors_file=STATES_FILE, lazy=lazy
        )
        index = check_index(index, directory / INDEX_FILE)
        memory = cls(**{name: index[name] for name in MODEL_FIELDS}, device=device)
        memory.take(index, tensors, directory)
        return memory

    def read(self, directory: str | os.PathLike, *, lazy: bool | None = None) -> None:
        """Replace this memory's edits by those saved in `directory` (`lazy` as `load`).

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: the files are malformed or damaged, or were saved for another hidden
                size, other layers or another model type than this memory's (named).
        """
        directory = Path(directory)
        index, tensors, _ = EditStore.read_files(
            directory, index_file=INDEX_FILE, tensors_file=STATES_FILE, lazy=lazy
        )
        self.take(index, tensors, directory)

    def take(
        self, index: dict[str, Any], tensors: dict[str, Any], directory: Path
    ) -> None:
        """Replace this memory's edits by a saved index and its tensors, read from `directory`
        (checked against this memory's model fields and against each other)."""
        index_path = Path(directory) / INDEX_FILE
        index = check_index(index, index_path)
        for name in MODEL_FIELDS:
            if index[name] != getattr(self, name):
                raise ValueError(
                    f"{index_path}: {name} is {index[name]!r}, this memory needs "
                    f"{getattr(self, name)!r}"
                )
        check_lengths(index, index_path)
        self._store.take(
            index,
            tensors,
            index_path=index_path,
            tensors_path=Path(directory) / STATES_FILE,
            # Unknown for edits stored before the part existed: NaN, refused by gate_vectors.
            fill={
                f"key.{part}": float("nan")
                for part, since in PART_SINCE_FORMAT.items()
                if index["format"] < since
            },
            share=[("text", "visual")] if self.text_layer == self.visual_layer else [],
            allow_nonfinite=[f"key.{part}" for part in PART_SINCE_FORMAT],
        )

    def _meta(self) -> dict[str, Any]:
        return {"format": MEMORY_FORMAT, **{name: getattr(self, name) for name in MODEL_FIELDS}}
