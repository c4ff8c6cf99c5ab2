"""Which inputs a gate should open for, which it should leave alone, the analysis's plain mean
keys, and the threshold search's candidates and tie rule: what the pairwise gate analysis
(gate.py) and its stored-edits mode (stored.py) share."""

from __future__ import annotations

import numpy as np

#: Queries the gate should open for (the edit's generality samples).
IN_SCOPE: tuple[str, ...] = ("t_gen", "v_gen")
#: Queries it should stay closed for (locality; "m_loc_hard" only where records have it).
OUT_OF_SCOPE: tuple[str, ...] = ("m_loc", "m_loc_hard", "t_loc")
QUERY_KINDS: tuple[str, ...] = IN_SCOPE + OUT_OF_SCOPE
#: Plain mean keys of the analysis (cosine of raw means); the rest are the gate's own kinds.
MEAN_KEYS: tuple[str, ...] = ("image_mean", "text_mean")


def threshold_candidates(values: np.ndarray) -> np.ndarray:
    """The thresholds a search tries over observed similarities: the lowest value (accept all),
    the midpoints of the sorted distinct values, and just above the highest (reject all).
    [k] -> [distinct + 1], ascending."""
    distinct = np.unique(values)  # sorted
    return np.concatenate(
        [distinct[:1], (distinct[:-1] + distinct[1:]) / 2, [np.nextafter(distinct[-1], np.inf)]]
    )


def first_run_middle(score: np.ndarray) -> int:
    """Index of the middle of the first run of consecutive candidates tied at the best (highest)
    score: the tie rule of the threshold searches."""
    tied = np.flatnonzero(score == score.max())
    run = tied[: int(np.argmax(np.diff(np.append(tied, tied[-1] + 2)) > 1)) + 1]
    return int(run[len(run) // 2])
