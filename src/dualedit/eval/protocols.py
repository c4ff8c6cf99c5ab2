"""The two editing protocols: single edit (apply, score, restore) and sequential (N edits, score).

Both return `RunResult`s. A method is given each record's `EditRequest` (image, prompt, new
answer) only; the rephrase and locality samples stay with the scorers. Locality compares the edited model with the unedited one. The unedited
predictions are computed once per scoring group, before any edit, in exactly the batches the
edited scoring uses (locality samples are run apart from the Rel/Gen samples): with the same batch
composition an editor that leaves a sample alone reproduces the unedited logits bit for bit and
scores exactly 100, instead of flipping near-tied ranks on float noise from padding.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

from tqdm.auto import tqdm

from dualedit.data.prompts import Sample
from dualedit.data.records import EditRecord
from dualedit.data.requests import edit_requests
from dualedit.eval.forward import EvalContext, predict, record_items
from dualedit.eval.generation import generation_metrics
from dualedit.eval.results import RunResult, mean_metrics
from dualedit.eval.scorers import ACCURACY_KEYS, LOCALITY_KEYS, SamplePrediction

logger = logging.getLogger(__name__)

Predictions = dict[tuple[int, str], SamplePrediction]
Samples = Sequence[dict[str, Sample]]


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


def locality(
    ctx: EvalContext, positions: Sequence[int], samples: Samples, *, desc: str = "",
    progress: bool | None = None,
) -> Predictions:
    """Predictions for the locality samples of the records at `positions`, batched together."""
    items = record_items(samples, positions, keys=LOCALITY_KEYS)
    return predict(ctx, items, desc=desc, progress=progress)


def unedited_locality(
    ctx: EvalContext, groups: Sequence[Sequence[int]], samples: Samples, desc: str
) -> list[Predictions]:
    """The unedited model's locality predictions, one scoring group at a time (no edit applied)."""
    show = ctx.progress and len(groups) > 1
    return [
        locality(ctx, group, samples, desc=desc, progress=ctx.progress and not show)
        for group in tqdm(groups, desc=desc, disable=not show, leave=False)
    ]


def score_group(
    ctx: EvalContext,
    positions: Sequence[int],
    records: Sequence[EditRecord],
    samples: Samples,
    unedited: Predictions,
    *,
    generation: bool,
    desc: str = "",
    progress: bool | None = None,
) -> list[dict[str, object]]:
    """Score the records at `positions` on the model as edited now.

    Returns:
        Per-record dicts {"index", rel, t_gen, v_gen, t_loc, m_loc[, m_loc_hard, gen_em, gen_text]}.
    """
    edited = predict(
        ctx, record_items(samples, positions, keys=ACCURACY_KEYS), desc=desc, progress=progress
    )
    edited.update(locality(ctx, positions, samples, desc=desc, progress=progress))
    generated = None
    if generation:
        rel = record_items(samples, positions, keys=("rel",))
        generated = generation_metrics(ctx, rel, desc=f"{desc} generate", progress=progress)
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


def run_single(
    ctx: EvalContext,
    records: Sequence[EditRecord],
    samples: Samples,
    *,
    generation: bool,
    n_values: Sequence[int] = (),
) -> list[RunResult]:
    """Single-edit protocol: for each record apply its edit, score its samples, restore.

    An editor whose `apply` is a no-op (`batched`) is scored in big batches instead, without
    calling `apply`. `n_values` is ignored.
    """
    started = time.perf_counter()
    positions = list(range(len(records)))
    if ctx.editor.batched:
        (unedited,) = unedited_locality(ctx, [positions], samples, "unedited locality")
        rows = score_group(
            ctx, positions, records, samples, unedited, generation=generation, desc="score"
        )
        return [_run(None, rows, started)]
    groups = [[position] for position in positions]
    references = unedited_locality(ctx, groups, samples, "unedited locality")
    rows = []
    for group, unedited in tqdm(
        list(zip(groups, references)), desc=f"{ctx.editor.name} single", disable=not ctx.progress
    ):
        requests = edit_requests([records[p] for p in group], ctx.task)
        with ctx.editor.applied(requests, ctx.load_image):
            rows += score_group(
                ctx, group, records, samples, unedited, generation=generation, progress=False
            )
    return [_run(None, rows, started)]


def run_sequential(
    ctx: EvalContext,
    records: Sequence[EditRecord],
    samples: Samples,
    *,
    generation: bool,
    n_values: Sequence[int] = (1, 10, 100),
) -> list[RunResult]:
    """Sequential (lifelong) protocol: apply edits one by one without restoring; after the first
    N (for each N in `n_values`) score all N records; restore at the end.

    Scoring does not change the edited model, so one pass over max(N) edits serves every N. The
    first run's wall time includes the unedited predictions; each run counts the edits added
    since the previous N and its scoring.
    """
    started = time.perf_counter()
    ns = checkpoints(n_values, len(records))
    references = unedited_locality(
        ctx, [list(range(n)) for n in ns], samples, "unedited locality"
    )
    runs = []
    applied = 0
    try:
        for n, unedited in zip(ns, references):
            for position in tqdm(
                range(applied, n), desc=f"{ctx.editor.name} edits {applied + 1}-{n}",
                disable=not ctx.progress, leave=False,
            ):
                ctx.editor.apply(edit_requests([records[position]], ctx.task), ctx.load_image)
            applied = n
            rows = score_group(
                ctx, list(range(n)), records, samples, unedited, generation=generation,
                desc=f"score N={n}",
            )
            runs.append(_run(n, rows, started))
            logger.info("%s sequential N=%d: %s", ctx.editor.name, n, runs[-1].means)
            started = time.perf_counter()
    finally:
        ctx.editor.restore()
    return runs


PROTOCOLS: dict[str, Callable[..., list[RunResult]]] = {
    "single": run_single,
    "sequential": run_sequential,
}
