"""Metrics of the knowledge-editing benchmark, as pure tensor functions plus one `Scorer` per name.

Conventions (teacher forcing, see docs/architecture.md "Scoring"): the logits at position p predict
token p + 1, so `target_mask[b, p]` is True where the prediction made at p is a target token and
`target_ids[b, p]` holds that token (-100 elsewhere).

Two scorers:

- ``"paper"`` (default, the DualEdit paper's tables): Rel / T-Gen / V-Gen are the per-sample
  fraction of target tokens whose argmax is right; T-Loc / M-Loc (and hard M-Loc) are the
  fraction of answer positions where the edited model's argmax equals the unedited model's.
- ``"easyedit"`` (EasyEdit's MMEdit evaluation): Rel / Gen as above; T-Loc is top-1 agreement at
  every non-pad position of the sequence (prompt, image positions and answer); M-Loc (and hard
  M-Loc) is ordered top-10 agreement at every non-pad position: the fraction of (position, rank)
  pairs whose token ids are equal. EasyEdit scores one unpadded sample at a time, so "every
  position" there is "every non-pad position" here.

Per-sample values are fractions in [0, 1]; the harness reports means x100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

#: Edit-success metrics: accuracy of the target tokens themselves.
ACCURACY_KEYS = ("rel", "t_gen", "v_gen")
#: Locality metrics: agreement with the unedited model.
LOCALITY_KEYS = ("t_loc", "m_loc", "m_loc_hard")
#: The five metrics whose mean is the paper's "Avg".
AVG_KEYS = ("rel", "t_gen", "v_gen", "t_loc", "m_loc")


def _masked_mean(hits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hits` over `mask` along every dimension but the first; NaN where mask is empty.

    Args:
        hits: bool [b, ...], mask: bool [b, ...] (same shape).

    Returns:
        float [b].
    """
    hits = (hits & mask).flatten(1).sum(1).double()  # [b]
    count = mask.flatten(1).sum(1).double()  # [b]
    return torch.where(count > 0, hits / count.clamp(min=1), torch.full_like(count, float("nan")))


def token_accuracy(
    logits: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """Per-sample fraction of target tokens whose argmax prediction is right.

    Args:
        logits: [b, s, V]; the logits at position p predict token p + 1.
        target_ids: long [b, s], the token to predict at each masked position.
        target_mask: bool [b, s].

    Returns:
        float64 [b] in [0, 1]; NaN for a sample without target positions.

    Example:
        >>> token_accuracy(logits, batch.target_ids, batch.target_mask)  # doctest: +SKIP
        tensor([1.0000, 0.5000], dtype=torch.float64)
    """
    pred = logits.argmax(-1)  # [b, s]
    return _masked_mean(pred == target_ids, target_mask)


def answer_agreement(
    edited_logits: torch.Tensor, unedited_logits: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """Paper locality: fraction of answer positions where edited and unedited argmax agree.

    Args:
        edited_logits, unedited_logits: [b, s, V] for the same inputs.
        target_mask: bool [b, s], the answer positions.

    Returns:
        float64 [b] in [0, 1]; NaN for a sample without answer positions.
    """
    same = edited_logits.argmax(-1) == unedited_logits.argmax(-1)  # [b, s]
    return _masked_mean(same, target_mask)


def topk_agreement(
    edited_logits: torch.Tensor, unedited_logits: torch.Tensor, mask: torch.Tensor, k: int
) -> torch.Tensor:
    """EasyEdit locality: ordered top-k agreement at the masked positions.

    The top-k token ids (sorted by logit) are compared rank by rank; the value is the fraction of
    (position, rank) pairs that are equal. k = 1 is plain argmax agreement.

    Args:
        edited_logits, unedited_logits: [b, s, V] for the same inputs.
        mask: bool [b, s], usually the attention mask (every non-pad position).
        k: number of ranks compared.

    Returns:
        float64 [b] in [0, 1]; NaN for a sample without masked positions.
    """
    k = min(k, edited_logits.shape[-1])
    edited = edited_logits.topk(k, dim=-1).indices  # [b, s, k]
    unedited = unedited_logits.topk(k, dim=-1).indices  # [b, s, k]
    return _masked_mean(edited == unedited, mask.unsqueeze(-1).expand_as(edited))


def exact_match(prediction: str, target: str, *, case_sensitive: bool = True) -> bool:
    """Generation exact match: the stripped decoded answer equals the stripped target.

    Case-sensitive by default, because the target string is what the edit asked for; a
    lower-casing tokenizer therefore cannot match a target with capitals. Pass
    `case_sensitive=False` to compare case-folded strings.
    """
    prediction, target = prediction.strip(), target.strip()
    if not case_sensitive:
        prediction, target = prediction.casefold(), target.casefold()
    return prediction == target


@dataclass(frozen=True)
class SamplePrediction:
    """What one forward pass says about one sample, kept so that batches need not line up.

    `answer` holds the argmax at the answer positions [n_answer]; `top` the top-k ids at every
    non-pad position [n_valid, k] (k = 0 when the scorer does not need them). `accuracy` is the
    token accuracy against the target.
    """

    accuracy: float
    answer: torch.Tensor
    top: torch.Tensor


def agreement(edited: torch.Tensor, unedited: torch.Tensor) -> float:
    """Fraction of equal elements of two prediction tensors of one sample (same shape)."""
    if edited.shape != unedited.shape:
        raise ValueError(
            f"edited and unedited predictions differ in shape ({tuple(edited.shape)} vs "
            f"{tuple(unedited.shape)}): the sample was encoded differently"
        )
    if edited.numel() == 0:
        return float("nan")
    return (edited == unedited).double().mean().item()


class Scorer:
    """Turns per-sample predictions into a record's metric dict.

    Subclasses set `name` and say which ranks they keep per sample kind (`top_k`).
    """

    name: str = ""
    #: sample key -> number of top ranks kept at every non-pad position (0: none).
    top_k: Mapping[str, int] = {}

    def predictions(
        self,
        key: str,
        logits: torch.Tensor,
        target_ids: torch.Tensor,
        target_mask: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> list[SamplePrediction]:
        """Summarise the logits of a batch of samples of kind `key` (e.g. "t_loc").

        Args:
            logits: [b, s, V]; target_ids: long [b, s]; target_mask, attention_mask: [b, s].

        Returns:
            One `SamplePrediction` per row, independent of padding and batch composition.
        """
        target_mask = target_mask.bool()
        valid = attention_mask.bool()
        accuracy = token_accuracy(logits, target_ids, target_mask)  # [b]
        argmax = logits.argmax(-1)  # [b, s]
        k = min(self.top_k.get(key, 0), logits.shape[-1])
        top = logits.topk(k, dim=-1).indices if k else None  # [b, s, k]
        out = []
        for row in range(logits.shape[0]):
            kept = top[row][valid[row]] if top is not None else argmax.new_empty((0, 0))
            out.append(
                SamplePrediction(
                    accuracy=accuracy[row].item(),
                    answer=argmax[row][target_mask[row]].cpu(),  # [n_answer]
                    top=kept.cpu(),  # [n_valid, k]
                )
            )
        return out

    def locality(self, key: str, edited: SamplePrediction, unedited: SamplePrediction) -> float:
        """Agreement of the edited model with the unedited one on locality sample `key`."""
        if self.top_k.get(key, 0):
            return agreement(edited.top, unedited.top)
        return agreement(edited.answer, unedited.answer)

    def record_metrics(
        self,
        edited: Mapping[str, SamplePrediction],
        unedited: Mapping[str, SamplePrediction],
    ) -> dict[str, float]:
        """Metric dict of one record: {rel, t_gen, v_gen, t_loc, m_loc[, m_loc_hard]} in [0, 1].

        Args:
            edited: sample key -> prediction of the edited model, for every sample of the record.
            unedited: locality key -> prediction of the unedited model.
        """
        metrics = {key: edited[key].accuracy for key in ACCURACY_KEYS}
        for key in LOCALITY_KEYS:
            if key in edited:
                if key not in unedited:
                    raise ValueError(f"no unedited prediction for locality sample {key!r}")
                metrics[key] = self.locality(key, edited[key], unedited[key])
        return metrics


class PaperScorer(Scorer):
    """The DualEdit paper's scoring: argmax agreement at the answer positions."""

    name = "paper"
    top_k = {}


class EasyEditScorer(Scorer):
    """EasyEdit's scoring: top-1 (T-Loc) and ordered top-10 (M-Loc) at every non-pad position."""

    name = "easyedit"
    top_k = {"t_loc": 1, "m_loc": 10, "m_loc_hard": 10}


SCORERS: dict[str, type[Scorer]] = {"paper": PaperScorer, "easyedit": EasyEditScorer}


def get_scorer(name: str) -> Scorer:
    """The scorer called `name` ("paper" or "easyedit")."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose one of {sorted(SCORERS)}")
    return SCORERS[name]()


def average(metrics: Mapping[str, float]) -> float:
    """The paper's Avg: mean of Rel, T-Gen, V-Gen, T-Loc and M-Loc."""
    missing = [key for key in AVG_KEYS if key not in metrics]
    if missing:
        raise ValueError(f"cannot average: metrics {missing} are missing")
    return sum(metrics[key] for key in AVG_KEYS) / len(AVG_KEYS)
