"""Choosing the gate threshold `tau` on held-out edits.

The paper's thresholds (LLaVA 0.6, BLIP-2 0.8) belong to 32-layer 4096- and 2560-wide models; on
another model the similarities sit elsewhere (on the built-in world's small LLaVA every input,
related or not, scores above 0.6 at the text layer). `choose_tau` edits each held-out record
alone and measures the gate similarity of inputs that must pass (its T-Gen and V-Gen inputs) and
of inputs that must not (its M-Loc, hard M-Loc and T-Loc inputs), then takes the threshold with
the most right decisions (ties: the midpoint of the widest gap). The gate key's layer sits
below every adapter's output, so the similarities do not depend on the trained weights.

With `mode="sequential"` all held-out edits are stored at once, as in the sequential protocol,
and each input is scored against its nearest stored edit: an unrelated input then meets every
stored edit, not one, and the threshold rises to keep it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from dualedit.data.prompts import record_samples

if TYPE_CHECKING:
    from dualedit.data.mmedit import MMEditDataset
    from dualedit.data.records import EditRecord
    from dualedit.editors.dualedit.editor import DualEditor

#: Inputs that must pass the gate of their own edit, and inputs that must not.
PASS_KINDS: tuple[str, ...] = ("t_gen", "v_gen")
BLOCK_KINDS: tuple[str, ...] = ("m_loc", "m_loc_hard", "t_loc")
#: "single": each held-out edit alone in the memory; "sequential": all of them at once.
CALIBRATION_MODES: tuple[str, ...] = ("single", "sequential")


@dataclass(frozen=True)
class TauChoice:
    """The chosen threshold and how it decides on the edits it was chosen on.

    Attributes:
        tau: the threshold.
        accuracy: fraction of right decisions (pass kinds >= tau, block kinds < tau), 0-1.
        pass_rates: per input kind, the fraction whose similarity reaches tau (0-1).
        edits: how many edits it was chosen on.
        mode: how they were stored ("single" or "sequential", see `choose_tau`).
    """

    tau: float
    accuracy: float
    pass_rates: dict[str, float]
    edits: int
    mode: str = "single"


def best_threshold(positives: torch.Tensor, negatives: torch.Tensor) -> tuple[float, float]:
    """The threshold with the most right decisions (positives >= t, negatives < t) and its
    accuracy; among equally good ones, the midpoint of the widest gap between neighbouring
    similarities.

    positives [p], negatives [n] (p + n >= 1) -> (threshold, accuracy in [0, 1]).

    Example:
        >>> best_threshold(torch.tensor([0.9, 0.95]), torch.tensor([0.5, 0.7]))
        (0.8, 1.0)
    """
    values = torch.cat([positives, negatives]).double().sort().values.unique()  # [k]
    # Candidates: below everything, every midpoint between neighbours, above everything.
    mids = (values[1:] + values[:-1]) / 2
    candidates = torch.cat([values[:1] - 1e-6, mids, values[-1:] + 1e-6])  # [k + 1]
    pos, neg = positives.double(), negatives.double()
    right = (pos[None, :] >= candidates[:, None]).sum(1) + (neg[None, :] < candidates[:, None]).sum(1)
    best = int(right.max())
    gaps = torch.cat([values[:1] - values[:1], values[1:] - values[:-1], values[-1:] - values[-1:]])
    gaps = torch.where(right == best, gaps, torch.full_like(gaps, -1.0))
    pick = int(gaps.argmax())
    return round(float(candidates[pick]), 6), best / (len(pos) + len(neg))


def choose_tau(
    editor: DualEditor,
    dataset: MMEditDataset,
    indices: Sequence[int],
    *,
    mode: str = "single",
) -> TauChoice:
    """Choose `tau` on the records `indices` of `dataset` (held-out edits, never eval records).

    Args:
        editor: a DualEditor with an empty memory (refused otherwise rather than lose edits).
        dataset, indices: the held-out records.
        mode: "single" = each record is edited alone and the memory emptied after each;
            "sequential" = every record's edit is stored at once and each input is scored
            against its nearest stored edit. There, a T-Gen/V-Gen input whose nearest edit is
            not its own is wrong whatever tau is and is left out of the choice (and of
            `pass_rates`); an M-Loc input may meet an edit of the very fact it asks when the
            held-out edits are not distinct facts, which only makes tau stricter.

    Raises:
        ValueError: no indices, an unknown mode, or the editor's memory is not empty.
    """
    if not indices:
        raise ValueError("choose_tau needs at least one held-out edit")
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"choose_tau: mode must be one of {CALIBRATION_MODES}, got {mode!r}")
    if len(editor.memory):
        raise ValueError(f"choose_tau needs an empty edit memory; this editor holds "
                         f"{len(editor.memory)} edits")
    sims: dict[str, list[float]] = {kind: [] for kind in PASS_KINDS + BLOCK_KINDS}

    def measure(record: EditRecord, own: object) -> None:
        for kind, sample in record_samples(record, dataset.task).items():
            if kind in sims:
                image = None if sample.image is None else dataset.images(sample.image)
                decision = editor.explain(image, sample.prompt)
                if kind in PASS_KINDS and decision.edit_id != own:
                    continue  # another edit is nearest: no threshold makes it right
                sims[kind].append(decision.similarity)

    if mode == "single":
        for index in indices:
            record = dataset[index]
            editor.apply([record], dataset.task, dataset.images)
            try:
                measure(record, editor.memory.ids[0])
            finally:
                editor.restore()
    else:
        records = [dataset[index] for index in indices]
        editor.apply(records, dataset.task, dataset.images)
        try:
            ids = editor.memory.ids  # insertion order: one per record
            for record, own in zip(records, ids, strict=True):
                measure(record, own)
        finally:
            editor.restore()
    positives = torch.tensor([s for k in PASS_KINDS for s in sims[k]])
    negatives = torch.tensor([s for k in BLOCK_KINDS for s in sims[k]])
    tau, accuracy = best_threshold(positives, negatives)
    rates = {k: sum(s >= tau for s in v) / len(v) for k, v in sims.items() if v}
    return TauChoice(tau=tau, accuracy=accuracy, pass_rates=rates, edits=len(indices), mode=mode)
