"""The edit objective every trained method shares, from logits at an `EditBatch`'s target
positions: the per-edit NLL and accuracy of the new answer on the edit sample and its two
generality samples, and the KL and argmax agreement of the locality samples with the unedited
model (the DualEdit paper's eq. 5; MEND's and KE's edit + locality losses on the same samples).

A method computes logits its own way (DualEdit: adapters on a frozen prefix; MEND, KE: a weight
update through hooks; SERAC, LTE: a prefixed input) and hands them here as `[k, vocab]` at the
batch's `target_mask` positions in row-major order; `pass_output` turns them into a
`PassOutput`, whose `loss` and `metrics` the training loop logs and validates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dualedit.data.prompts import EncodedBatch

#: Validation metric names, as in the evaluation harness; the score is their mean.
METRICS: tuple[str, ...] = ("rel", "t_gen", "v_gen", "t_loc", "m_loc")
#: The generality blocks of `EditBatch.images` whose target is the new answer, in order.
ANSWER_KEYS: tuple[str, ...] = ("rel", "t_gen", "v_gen")


@dataclass
class PassOutput:
    """Per-edit values of one pass over n edits (each [n]).

    Attributes:
        nll: {"rel", "t_gen", "v_gen"}: mean NLL of the alt target tokens.
        kl: {"m_loc"[, "t_loc"]}: mean KL(unedited || edited) over the answer positions.
        accuracy: {"rel", "t_gen", "v_gen"}: fraction of target tokens predicted (argmax).
        agreement: {"m_loc"[, "t_loc"]}: fraction of answer positions where the edited argmax
            equals the unedited one.
    """

    nll: dict[str, torch.Tensor]
    kl: dict[str, torch.Tensor]
    accuracy: dict[str, torch.Tensor]
    agreement: dict[str, torch.Tensor]

    def loss(
        self, text_loc_kl: bool = True, loc_weight: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(l_rel + l_gen + loc_weight * l_loc, {"l_rel", "l_gen", "l_loc"}), means over the
        edits."""
        l_rel = self.nll["rel"].mean()
        l_gen = self.nll["t_gen"].mean() + self.nll["v_gen"].mean()
        l_loc = self.kl["m_loc"].mean()
        if text_loc_kl:
            l_loc = l_loc + self.kl["t_loc"].mean()
        return l_rel + l_gen + loc_weight * l_loc, {"l_rel": l_rel, "l_gen": l_gen, "l_loc": l_loc}

    def metrics(self) -> dict[str, torch.Tensor]:
        """{metric: [n] fraction} in `METRICS` order (t_loc only when the pass ran it)."""
        merged = {**self.accuracy, **self.agreement}
        return {key: merged[key] for key in METRICS if key in merged}


def pass_output(
    images: EncodedBatch,
    logits: torch.Tensor,
    reference: torch.Tensor,
    n: int,
    *,
    text: EncodedBatch | None = None,
    text_logits: torch.Tensor | None = None,
    text_reference: torch.Tensor | None = None,
) -> PassOutput:
    """The `PassOutput` of an edited pass over an `EditBatch` of n edits.

    Args:
        images: the batch's image rows (blocks rel, t_gen, v_gen, m_loc of n rows each).
        logits: [k, vocab], the edited model's logits at `images.target_mask` (row-major).
        reference: [k_loc, vocab], the unedited model's at the m_loc block's target positions.
        n: edits in the batch.
        text, text_logits, text_reference: the text-only locality rows, the edited and unedited
            logits at their target positions (all or none).
    """
    rows = images.target_mask.nonzero()[:, 0]  # [k] the row of each target position
    targets = images.target_ids[images.target_mask]  # [k]
    block = rows // n  # [k] which block of rows
    out = PassOutput(nll={}, kl={}, accuracy={}, agreement={})
    token_nll = F.cross_entropy(logits.float(), targets, reduction="none")  # [k]
    hits = (logits.argmax(dim=-1) == targets).double()  # [k]
    for i, key in enumerate(ANSWER_KEYS):
        sel = block == i
        out.nll[key] = row_mean(token_nll[sel], rows[sel] - i * n, n)
        out.accuracy[key] = row_mean(hits[sel], rows[sel] - i * n, n)
    sel = block == len(ANSWER_KEYS)
    out.kl["m_loc"], out.agreement["m_loc"] = locality(
        reference, logits[sel], rows[sel] - len(ANSWER_KEYS) * n, n
    )
    given = [x is not None for x in (text, text_logits, text_reference)]
    if any(given) and not all(given):
        raise ValueError("pass_output: give text, text_logits and text_reference together")
    if text is not None:
        text_rows = text.target_mask.nonzero()[:, 0]
        out.kl["t_loc"], out.agreement["t_loc"] = locality(
            text_reference, text_logits, text_rows, n
        )
    return out


def locality(
    reference: torch.Tensor, edited: torch.Tensor, rows: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean KL(reference || edited) and argmax agreement over the answer positions.

    reference, edited: [k, vocab] logits at the same positions; rows [k] -> ([n], [n]).
    """
    log_ref = F.log_softmax(reference.float(), dim=-1)  # [k, vocab]
    log_edit = F.log_softmax(edited.float(), dim=-1)  # [k, vocab]
    token_kl = (log_ref.exp() * (log_ref - log_edit)).sum(dim=-1)  # [k]
    agree = (reference.argmax(dim=-1) == edited.argmax(dim=-1)).double()  # [k]
    return row_mean(token_kl, rows, n), row_mean(agree, rows, n)


def row_mean(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of `values` [k] per row id in `rows` [k] (0..n-1): [n]; every row has positions."""
    total = values.new_zeros(n).index_add(0, rows, values)  # [n]
    count = torch.bincount(rows, minlength=n).to(values.dtype)  # [n]
    return total / count
