"""Fitting the "learned" gate key's heads (`heads.py`) for an editor, on train-split records.

Each record gives six inputs (`record_samples`): its edit sample and its T-Gen, V-Gen, M-Loc,
hard M-Loc (when the records have it) and T-Loc inputs. Their key parts are read from the frozen
model at the editor's text layer, exactly as the gate reads them (`capture_states`), and the
unedited answers mask out the pairs that may ask the very fact an edit changes. The eval split is
never read: callers pass train-split records with the validation edits held out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from dualedit.data.mmedit import MMEditDataset
from dualedit.data.prompts import record_samples
from dualedit.editors.dualedit.gate import LEARNED_PARTS
from dualedit.editors.dualedit.heads import BLOCK_KINDS, PASS_KINDS, GateHeads, fit_gate_heads

logger = logging.getLogger(__name__)

#: The record sample read as each fit kind ("rel" is the edit sample itself).
SAMPLE_OF = {"edit": "rel", **{k: k for k in PASS_KINDS + BLOCK_KINDS}}
#: Records whose key parts are read per frozen pass (the states are dropped after each).
CHUNK = 64
#: Records (outside the validation edits) the heads' fit needs at the least.
MIN_RECORDS = 2


def answer_of(record: Any, kind: str) -> str:
    """The unedited answer of a record's input of `kind` (for the ambiguity masks)."""
    return {"m_loc": record.m_loc_a, "m_loc_hard": record.hard_m_loc_a,
            "t_loc": record.loc_ans}.get(kind, record.pred)


def read_key_parts(
    editor: Any, samples: Sequence[Any], load_image: Any, parts: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The gate key parts {part: [len(samples), width] float32, CPU} of `samples`, read at the
    editor's text layer as the gate reads them (one frozen pass that stops there; the states are
    dropped on return, so callers pass at most `CHUNK`-sized groups to bound memory)."""
    triples = editor._capture(samples, load_image)
    return {part: torch.stack([keys[part].float().cpu() for _, _, keys in triples])
            for part in parts}


def gate_fit_data(
    editor: Any, dataset: MMEditDataset, indices: Sequence[int]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Key parts {kind: {part: [n, width]}} and answer ids {kind: [n]} of the records `indices`.

    Raises:
        ValueError: fewer than 2 records.
    """
    if len(indices) < MIN_RECORDS:
        raise ValueError(f"fitting the gate heads needs at least {MIN_RECORDS} records, got "
                         f"{len(indices)}")
    records = [dataset[i] for i in indices]
    kinds = [k for k in SAMPLE_OF if k != "m_loc_hard" or all(r.has_hard for r in records)]
    columns: dict[str, dict[str, list[torch.Tensor]]] = {
        k: {p: [] for p in LEARNED_PARTS} for k in kinds}
    for start in range(0, len(records), CHUNK):
        chunk = records[start:start + CHUNK]
        samples = [record_samples(r, dataset.task)[SAMPLE_OF[k]] for k in kinds for r in chunk]
        read = read_key_parts(editor, samples, dataset.images, LEARNED_PARTS)  # kind-major rows
        for j, kind in enumerate(kinds):
            for part, values in read.items():
                columns[kind][part].append(values[j * len(chunk):(j + 1) * len(chunk)])
    parts = {k: {p: torch.cat(v) for p, v in by_part.items()} for k, by_part in columns.items()}
    vocab: dict[str, int] = {}
    answers = {k: torch.tensor([vocab.setdefault(answer_of(r, k), len(vocab)) for r in records])
               for k in kinds}
    return parts, answers


def fit_gate(
    editor: Any,
    dataset: MMEditDataset,
    indices: Sequence[int],
    *,
    progress: bool = True,
    **settings: Any,
) -> GateHeads:
    """Fit gate heads on the records `indices` and give them to `editor` (its memory's
    `set_gate_heads`). `settings`: `fit_gate_heads`'s width, steps, batch_size, lr, seed."""
    parts, answers = gate_fit_data(editor, dataset, indices)
    heads = fit_gate_heads(parts, answers, progress=progress, **settings)
    editor.memory.set_gate_heads(heads)
    logger.info("gate heads fitted on %d records of %s (%s)", len(indices), dataset.path,
                ", ".join(parts))
    return heads
