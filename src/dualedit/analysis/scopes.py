"""Which inputs a gate should open for, which it should leave alone, and the analysis's plain mean
keys: the names shared by the pairwise gate analysis (gate.py) and its stored-edits mode
(stored.py)."""

from __future__ import annotations

#: Queries the gate should open for (the edit's generality samples).
IN_SCOPE: tuple[str, ...] = ("t_gen", "v_gen")
#: Queries it should stay closed for (locality; "m_loc_hard" only where records have it).
OUT_OF_SCOPE: tuple[str, ...] = ("m_loc", "m_loc_hard", "t_loc")
QUERY_KINDS: tuple[str, ...] = IN_SCOPE + OUT_OF_SCOPE
#: Plain mean keys of the analysis (cosine of raw means); the rest are the gate's own kinds.
MEAN_KEYS: tuple[str, ...] = ("image_mean", "text_mean")
