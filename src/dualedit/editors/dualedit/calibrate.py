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

Trained adapters get their tau on the validation edits of the train split (the same fixed
selection training validates on), saved with them: at the end of `train_dualedit`
(`calibrate_on`), or later for saved adapters (`calibrate_adapters`, `dualedit calibrate`), e.g.
for another gate key or calibration mode, or after the data changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dualedit.data.mmedit import SPLIT_FILES, MMEditDataset
from dualedit.data.prompts import record_samples
from dualedit.data.requests import edit_requests
from dualedit.editors.dualedit.editor import DualEditor
from dualedit.editors.dualedit.gate import LEARNED, gate_vectors, kind_parts, similarity_matrix
from dualedit.editors.dualedit.gate_fit import CHUNK, answer_of, fit_gate, read_key_parts
from dualedit.editors.dualedit.heads import MLP
from dualedit.train.data import split_indices
from dualedit.train.settings import TrainSettings

if TYPE_CHECKING:
    from dualedit.data.records import EditRecord

logger = logging.getLogger(__name__)

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
        stored: edits in the memory while choosing (sequential: the edits and any distractors;
            single: 1; None: not recorded).
    """

    tau: float
    accuracy: float
    pass_rates: dict[str, float]
    edits: int
    mode: str = "single"
    stored: int | None = None

    def describe(self) -> str:
        """One line for the command line."""
        rates = ", ".join(f"{k} {100 * v:.1f}%" for k, v in self.pass_rates.items())
        memory = (f", {self.stored} stored" if self.mode == "sequential" and self.stored
                  and self.stored != self.edits else "")
        return (
            f"gate threshold tau {self.tau:.4f} chosen on {self.edits} validation edits "
            f"({self.mode}{memory}; right decisions {100 * self.accuracy:.1f}%; pass rates: "
            f"{rates})"
        )


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
    distractors: Sequence[int] | None = None,
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
        distractors: with "sequential", other records of `dataset` whose edits are stored too
            (after those of `indices`), so that tau is chosen for a memory of that many more
            edits; only the inputs of `indices` are scored. Given (even empty), a stored edit
            whose question's unedited answer equals an input's unedited answer may edit the
            very fact the input asks (train records repeat facts, the eval split's do not) and
            is left out of that input's nearest edit, as the gate heads' fit leaves it out (an
            input's own edit is kept). None: every stored edit counts.

    Raises:
        ValueError: no indices, an unknown mode, distractors outside "sequential" or among
            `indices`, or the editor's memory is not empty.
    """
    if not indices:
        raise ValueError("choose_tau needs at least one held-out edit")
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"choose_tau: mode must be one of {CALIBRATION_MODES}, got {mode!r}")
    if len(editor.memory):
        raise ValueError(f"choose_tau needs an empty edit memory; this editor holds "
                         f"{len(editor.memory)} edits")
    if distractors is not None and mode != "sequential":
        raise ValueError(f"choose_tau: distractor edits are stored only in the sequential mode, "
                         f"not {mode!r}")
    if distractors is not None and set(distractors) & set(indices):
        raise ValueError("choose_tau: distractors must be other records than the held-out edits")
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
            editor.apply(edit_requests([record], dataset.task), dataset.images)
            try:
                measure(record, editor.memory.ids[0])
            finally:
                editor.restore()
    elif distractors is not None:
        sims = _similarities_among_distractors(editor, dataset, indices, distractors)
    else:
        records = [dataset[index] for index in indices]
        editor.apply(edit_requests(records, dataset.task), dataset.images)
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
    return TauChoice(tau=tau, accuracy=accuracy, pass_rates=rates, edits=len(indices), mode=mode,
                     stored=len(indices) + len(distractors or ()) if mode == "sequential" else 1)


#: The similarity given to a stored edit left out of an input's nearest edit.
LEFT_OUT = -2.0


@torch.no_grad()
def _similarities_among_distractors(
    editor: DualEditor, dataset: MMEditDataset, indices: Sequence[int], distractors: Sequence[int]
) -> dict[str, list[float]]:
    """`choose_tau`'s similarities {kind: [...]} with the edits of `indices` and `distractors`
    stored at once: each input of `indices` against its nearest stored edit, edits that may
    edit the very fact it asks (the same unedited answer; its own edit kept) left out."""
    records = [dataset[i] for i in indices]
    others = [dataset[i] for i in distractors]
    editor.apply(edit_requests(records + others, dataset.task), dataset.images)
    try:
        kind = editor.config.gate_key
        heads = editor.memory.gate_heads
        device = heads.threshold.device if heads is not None else torch.device("cpu")
        keys = editor.memory.key_matrix(kind, "cpu")  # [n + n_distractors, d], insertion order
        own_samples = [record_samples(r, dataset.task) for r in records]
        vocab: dict[str, int] = {}
        stored_answers = torch.tensor([vocab.setdefault(answer_of(r, "edit"), len(vocab))
                                       for r in records + others])  # [n + n_distractors]
        sims: dict[str, list[float]] = {k: [] for k in PASS_KINDS + BLOCK_KINDS}
        for query_kind in PASS_KINDS + BLOCK_KINDS:
            rows = [i for i, samples in enumerate(own_samples) if query_kind in samples]
            if not rows:
                continue
            samples = [own_samples[i][query_kind] for i in rows]
            chunks = [read_key_parts(editor, samples[start:start + CHUNK], dataset.images,
                                     kind_parts(kind)) for start in range(0, len(samples), CHUNK)]
            parts = {part: torch.cat([chunk[part] for chunk in chunks]).to(device)
                     for part in kind_parts(kind)}  # [q, width] each
            queries = gate_vectors(parts, kind, heads).cpu()  # [q, d]
            sim = similarity_matrix(queries, keys, kind)  # [q, n + n_distractors]
            answers = torch.tensor([vocab.get(answer_of(records[i], query_kind), -1)
                                    for i in rows])  # [q]; -1: no stored edit has it
            same = answers[:, None] == stored_answers[None, :]  # [q, n + n_distractors]
            own = torch.zeros_like(same)
            if query_kind in PASS_KINDS:
                own[torch.arange(len(rows)), torch.tensor(rows)] = True
            # Left out: below every cosine (a row with every edit left out is one with no edit).
            sim = sim.masked_fill(same & ~own, LEFT_OUT)
            best, position = sim.max(dim=1)  # [q], [q]
            own = position == torch.tensor(rows)
            keep = own if query_kind in PASS_KINDS else torch.ones_like(own)
            sims[query_kind] = best[keep].tolist()
        return sims
    finally:
        editor.restore()


# -- trained adapters ------------------------------------------------------------------------------


def calibrate_adapters(
    model: nn.Module,
    processor: Any,
    adapters_dir: str | os.PathLike,
    train_dataset: MMEditDataset,
    *,
    out_dir: str | os.PathLike | None = None,
    val_edits: int | None = None,
    mode: str = "single",
    gate_key: str | None = None,
    heads_mlp: int | None = None,
    stored: int | None = None,
    ignore_base_mismatch: bool = False,
) -> TauChoice:
    """Choose tau for saved adapters on the validation edits and save the adapters with it.

    Args:
        model, processor: the VLM the adapters were trained on.
        adapters_dir: a `save_pretrained` folder (e.g. a training run's best/).
        train_dataset: the train split; the validation edits are `split_indices(len, val_edits)`
            of it, the selection training held out (never the eval split).
        out_dir: where to save the calibrated adapters (None: `adapters_dir`, in place).
        val_edits: how many validation edits training held out (None: `TrainSettings`'s).
        mode: "single" or "sequential" (see `choose_tau`).
        gate_key: choose tau for this gate key and save it with the adapters (None: theirs).
        heads_mlp: with the "learned" key, hidden units of the gate heads' two layers (0: linear
            heads; None: `heads.MLP`; see `heads.GateHeads`).
        stored: with "sequential", choose tau for a memory of this many edits: the validation
            edits and `stored - val_edits` other train records' edits as distractors (a fixed
            seeded selection; see `choose_tau`). None: the validation edits alone.
        ignore_base_mismatch: load adapters saved for other base weights (see
            `Editor.from_pretrained`).

    Returns:
        The `TauChoice`.

    Raises:
        ValueError: the eval split, an unknown mode, a bad number of validation edits,
            `heads_mlp` with a gate key other than "learned", or a bad `stored`.

    Example:
        >>> calibrate_adapters(model, processor, "runs/vqa/best", load_split(root, "vqa", "train"),
        ...                    out_dir="runs/vqa/best-seq", mode="sequential")
    """
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"calibration mode must be one of {CALIBRATION_MODES}, got {mode!r}")
    check_heads_mlp(heads_mlp)
    if train_dataset.path.name == Path(SPLIT_FILES[(train_dataset.task, "eval")]).name:
        raise ValueError(f"{train_dataset.path}: the eval split; tau is chosen on the validation "
                         "edits of the train split")
    n_val = TrainSettings().val_edits if val_edits is None else val_edits
    _, val_idx = split_indices(len(train_dataset), n_val)
    distractors = distractor_indices(len(train_dataset), val_idx, stored, mode)
    overrides: dict[str, Any] = {} if gate_key is None else {"gate_key": gate_key}
    if ignore_base_mismatch:
        overrides["ignore_base_mismatch"] = True
    return calibrate_on(
        model, processor, Path(adapters_dir), train_dataset, val_idx, mode,
        out_dir=Path(out_dir) if out_dir is not None else None, heads_mlp=heads_mlp,
        distractors=distractors, **overrides,
    )


#: Seed of the selection of distractor records (`distractor_indices`).
DISTRACTOR_SEED = 1


def distractor_indices(
    n_records: int, val_idx: Sequence[int], stored: Any, mode: str
) -> list[int] | None:
    """The train records whose edits are stored beside the validation edits `val_idx` so that
    `stored` edits are in the memory (a fixed seeded selection of the others, sorted; None for
    `stored` None: the validation edits alone, every stored edit counted).

    Raises:
        ValueError: `stored` not an int in [len(val_idx), n_records], or not "sequential".
    """
    if stored is None:
        return None
    if mode != "sequential":
        raise ValueError(f"calibration option stored={stored}: a memory of many edits is "
                         f"calibrated in the sequential mode (add --option mode=sequential)")
    if isinstance(stored, bool) or not isinstance(stored, int) or not (
            len(val_idx) <= stored <= n_records):
        raise ValueError(f"calibration option stored: an int from the {len(val_idx)} validation "
                         f"edits to the {n_records} train records, got {stored!r}")
    held_out = set(val_idx)
    others = [i for i in range(n_records) if i not in held_out]
    order = torch.randperm(len(others), generator=torch.Generator().manual_seed(DISTRACTOR_SEED))
    return sorted(others[int(j)] for j in order[:stored - len(val_idx)])


def check_heads_mlp(heads_mlp: Any, gate_key: str | None = None, *, where: str = "") -> None:
    """Refuse a `heads_mlp` that is not None (the default size) or an int >= 0, or an int > 0
    with a gate key (`gate_key`, named by `where`; None: not known yet) other than "learned",
    which has no heads to shape."""
    if heads_mlp is None:
        return
    if isinstance(heads_mlp, bool) or not isinstance(heads_mlp, int) or heads_mlp < 0:
        raise ValueError(f"calibration option heads_mlp: an int >= 0, got {heads_mlp!r}")
    if heads_mlp and gate_key is not None and gate_key != LEARNED:
        raise ValueError(
            f"calibration option heads_mlp={heads_mlp}: gate heads exist only with "
            f"gate_key={LEARNED!r}, and {where or 'the gate key'} is {gate_key!r} "
            f"(add --option gate_key={LEARNED})"
        )


def calibrate_on(
    model: nn.Module,
    processor: Any,
    adapters_dir: Path,
    dataset: MMEditDataset,
    val_idx: list[int],
    mode: str = "single",
    *,
    out_dir: Path | None = None,
    heads_mlp: int | None = None,
    distractors: Sequence[int] | None = None,
    **overrides: Any,
) -> TauChoice:
    """Choose tau on the edits `val_idx` and save the adapters with it (and `overrides`, run-time
    config fields such as gate_key) to `out_dir` (default: `adapters_dir`).

    With the "learned" gate key, the gate heads are fitted first (`gate_fit.fit_gate`) on the
    other records of `dataset` (the validation edits held out), and saved with the adapters
    (`heads_mlp`: hidden units of their two layers, 0: linear, None: `heads.MLP`; a number is
    refused with another key). `distractors`: records whose edits are stored too while choosing
    (sequential mode, see `choose_tau`)."""
    editor = DualEditor.from_pretrained(model, processor, adapters_dir, **overrides)
    try:
        check_heads_mlp(heads_mlp, editor.config.gate_key, where=f"{adapters_dir}'s gate key")
    except ValueError:
        editor.detach()
        raise
    was_training = model.training
    model.eval()
    heads = None
    try:
        if editor.config.gate_key == LEARNED:
            held_out = set(val_idx)
            heads = fit_gate(editor, dataset,
                             [i for i in range(len(dataset)) if i not in held_out],
                             mlp=MLP if heads_mlp is None else heads_mlp)
        choice = choose_tau(editor, dataset, val_idx, mode=mode, distractors=distractors)
    finally:
        editor.detach()
        model.train(was_training)
    calibrated = DualEditor.from_pretrained(
        model, processor, adapters_dir, **overrides, tau=choice.tau
    )
    if heads is not None:
        calibrated.memory.set_gate_heads(heads)
    elif calibrated.config.gate_key != LEARNED:
        calibrated.memory.set_gate_heads(None)  # a fixed key: heads of an earlier fit not saved
    try:
        calibrated.save_pretrained(out_dir if out_dir is not None else adapters_dir)
    finally:
        calibrated.detach()
    logger.info("gate threshold chosen on %d validation edits (%s): tau %.4f (accuracy %.3f, "
                "pass rates %s)", choice.edits, choice.mode, choice.tau, choice.accuracy,
                {k: round(v, 3) for k, v in choice.pass_rates.items()})
    return choice
