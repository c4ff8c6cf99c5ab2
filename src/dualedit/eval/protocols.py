"""The two editing protocols: single edit (apply, score, restore) and sequential (N edits, score).

Both return `RunResult`s. Locality is always compared with the unedited predictions computed once
before any edit (`unedited`, keyed by (record position, sample key)).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

from tqdm.auto import tqdm

from dualedit.data.prompts import Sample
from dualedit.data.records import EditRecord
from dualedit.eval.forward import EvalContext, Item, predict, record_items
from dualedit.eval.generation import generation_metrics
from dualedit.eval.results import RunResult, mean_metrics
from dualedit.eval.scorers import LOCALITY_KEYS, SamplePrediction

logger = logging.getLogger(__name__)

Predictions = dict[tuple[int, str], SamplePrediction]


def checkpoints(n_values: Sequence[int], n_records: int) -> list[int]:
    """The sequential N values to report: those <= n_records, plus n_records when some N is
    larger (logged), sorted and unique.

    Example:
        >>> checkpoints((1, 10, 100), 25)
        [1, 10, 25]
    """
    if not n_values:
        raise ValueError("sequential protocol needs at least one N in n_values")
    bad = [n for n in n_values if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if bad:
        raise ValueError(f"n_values must be positive ints, got {bad}")
    kept = sorted({n for n in n_values if n <= n_records})
    if any(n > n_records for n in n_values):
        logger.warning(
            "only %d records: N values %s capped to %d",
            n_records, sorted(n for n in n_values if n > n_records), n_records,
        )
        kept = sorted(set(kept) | {n_records})
    return kept


def score_records(
    ctx: EvalContext,
    positions: Sequence[int],
    records: Sequence[EditRecord],
    edited: Predictions,
    unedited: Predictions,
    samples: Sequence[dict[str, Sample]],
    generated: dict[int, dict[str, object]] | None,
) -> list[dict[str, object]]:
    """Per-record metric dicts {"index", rel, t_gen, v_gen, t_loc, m_loc[, m_loc_hard, gen_em]}."""
    rows = []
    for position in positions:
        keys = samples[position]
        metrics = ctx.scorer.record_metrics(
            {key: edited[(position, key)] for key in keys},
            {key: unedited[(position, key)] for key in keys if key in LOCALITY_KEYS},
        )
        row: dict[str, object] = {"index": records[position].index, **metrics}
        if generated is not None:
            row.update(generated[position])
        rows.append(row)
    return rows


def _run(n_edits: int | None, rows: list[dict[str, object]], started: float) -> RunResult:
    wall = time.perf_counter() - started
    return RunResult(
        n_edits=n_edits,
        records=rows,
        means=mean_metrics(rows),
        wall_s=wall,
        records_per_s=len(rows) / wall if wall > 0 else float("inf"),
    )


def _score_all(
    ctx: EvalContext,
    positions: Sequence[int],
    samples: Sequence[dict[str, Sample]],
    generation: bool,
    desc: str,
    progress: bool | None = None,
) -> tuple[Predictions, dict[int, dict[str, object]] | None]:
    edited = predict(ctx, record_items(samples, positions), desc=desc, progress=progress)
    generated = None
    if generation:
        rel = record_items(samples, positions, keys=("rel",))
        generated = generation_metrics(ctx, rel, desc=f"{desc} generate", progress=progress)
    return edited, generated


def run_single(
    ctx: EvalContext,
    records: Sequence[EditRecord],
    samples: Sequence[dict[str, Sample]],
    unedited: Predictions,
    *,
    generation: bool,
    n_values: Sequence[int] = (),
) -> list[RunResult]:
    """Single-edit protocol: for each record apply its edit, score its samples, restore.

    An editor whose `apply` is a no-op (`batched`) is scored in big batches instead.
    """
    started = time.perf_counter()
    positions = range(len(records))
    if ctx.editor.batched:
        edited, generated = _score_all(ctx, positions, samples, generation, "score")
    else:
        edited: Predictions = {}
        generated = {} if generation else None
        for position in tqdm(positions, desc=f"{ctx.editor.name} single", disable=not ctx.progress):
            with ctx.editor.applied([records[position]], ctx.task, ctx.load_image):
                one, gen = _score_all(ctx, [position], samples, generation, "", progress=False)
            edited.update(one)
            if gen is not None:
                generated.update(gen)
    rows = score_records(ctx, positions, records, edited, unedited, samples, generated)
    return [_run(None, rows, started)]


def run_sequential(
    ctx: EvalContext,
    records: Sequence[EditRecord],
    samples: Sequence[dict[str, Sample]],
    unedited: Predictions,
    *,
    generation: bool,
    n_values: Sequence[int] = (1, 10, 100),
) -> list[RunResult]:
    """Sequential (lifelong) protocol: apply edits one by one without restoring; after the first
    N (for each N in `n_values`) score all N records; restore at the end.

    Scoring does not change the edited model, so one pass over max(N) edits serves every N; a
    run's wall time counts the edits added since the previous N and the scoring.
    """
    runs = []
    applied = 0
    try:
        for n in checkpoints(n_values, len(records)):
            started = time.perf_counter()
            for position in tqdm(
                range(applied, n), desc=f"{ctx.editor.name} edits {applied + 1}-{n}",
                disable=not ctx.progress, leave=False,
            ):
                ctx.editor.apply([records[position]], ctx.task, ctx.load_image)
            applied = n
            edited, generated = _score_all(ctx, range(n), samples, generation, f"score N={n}")
            rows = score_records(ctx, range(n), records, edited, unedited, samples, generated)
            runs.append(_run(n, rows, started))
            logger.info("%s sequential N=%d: %s", ctx.editor.name, n, runs[-1].means)
    finally:
        ctx.editor.restore()
    return runs


PROTOCOLS: dict[str, Callable[..., list[RunResult]]] = {
    "single": run_single,
    "sequential": run_sequential,
}
