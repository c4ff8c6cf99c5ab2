"""`evaluate`: one editing method on one MMEdit-format dataset under one protocol and scorer."""

from __future__ import annotations

import datetime
import logging
import re
import time
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from dualedit.data.prompts import PROMPT_PROTOCOL, record_samples
from dualedit.editors.base import Editor
from dualedit.eval.forward import EvalContext
from dualedit.eval.protocols import PROTOCOLS
from dualedit.eval.results import Results
from dualedit.eval.scorers import get_scorer
from dualedit.version import versions

logger = logging.getLogger(__name__)


def _split_of(path: Path) -> str | None:
    match = re.search(r"_(train|eval)(?:_edit)?\.json$", path.name)
    return match.group(1) if match else None


def evaluate(
    model: nn.Module,
    processor: Any,
    dataset: Any,
    editor: Editor,
    *,
    protocol: str = "single",
    scorer: str = "paper",
    n_values: Sequence[int] = (1, 10, 100),
    limit: int | None = None,
    batch_size: int = 16,
    generation: bool = True,
    case_sensitive: bool = True,
    progress: bool = True,
) -> Results:
    """Score an editing method on a dataset.

    The unedited predictions for T-Loc / M-Loc (and hard M-Loc where records have it) are
    computed before any edit, in the same batches as the edited scoring (see `eval.protocols`).
    Then the protocol runs: "single" applies each
    record's edit, scores its samples and restores; "sequential" applies the first N edits
    without restoring and scores all N records, for each N in `n_values`. The model is left as it
    was (eval/train mode and weights; the editor is restored).

    Args:
        model: the VLM (LLaVA or BLIP-2) the editor wraps.
        processor: its processor.
        dataset: an `MMEditDataset` (records, `task`, `path`, `images` loader, `protocol`).
        editor: an `Editor` built on `model` (see `editors.make_editor`).
        protocol: "single" or "sequential".
        scorer: "paper" or "easyedit" (see `eval.scorers`).
        n_values: the N values of the sequential protocol (capped to the number of records).
        limit: score only the first `limit` records.
        batch_size: samples per forward.
        generation: also score greedy-generation exact match on the Rel prompt ("gen_em").
        case_sensitive: for generation exact match.
        progress: tqdm progress bars.

    Returns:
        `Results` with one `RunResult` (single) or one per N (sequential).

    Example:
        >>> ds = load_split("world", "vqa", "eval")
        >>> results = evaluate(model, processor, ds, make_editor("none", model, processor))
        >>> results.runs[0].means["avg"]  # doctest: +SKIP
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if editor.model is not model:
        raise ValueError(
            f"editor {editor.name!r} was built on another model than the one evaluated"
        )
    records = list(dataset)[:limit] if limit is not None else list(dataset)
    if not records:
        raise ValueError(f"{getattr(dataset, 'path', 'dataset')}: no records to evaluate")
    task = dataset.task
    ctx = EvalContext(
        model=model,
        processor=processor,
        backbone=editor.backbone,
        editor=editor,
        scorer=get_scorer(scorer),
        load_image=dataset.images,
        task=task,
        batch_size=batch_size,
        progress=progress,
        case_sensitive=case_sensitive,
    )
    samples = [record_samples(record, task) for record in records]
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        editor.restore()  # start from the unedited model whatever happened before
        runs = PROTOCOLS[protocol](
            ctx, records, samples, generation=generation, n_values=tuple(n_values)
        )
    finally:
        model.train(was_training)
    wall = time.perf_counter() - started
    n_scored = max(len(run.records) for run in runs)
    path = Path(getattr(dataset, "path", ""))
    name_or_path = getattr(model.config, "name_or_path", "") or getattr(model, "name_or_path", "")
    results = Results(
        method=editor.name,
        editor_options=_editor_options(editor),
        backbone={"model_type": model.config.model_type, "name_or_path": str(name_or_path)},
        dataset={
            "path": str(path),
            "task": task,
            "split": _split_of(path),
            "n": len(records),
            "n_total": len(dataset),
        },
        protocol=protocol,
        scorer=scorer,
        prompt_protocol=getattr(dataset, "protocol", PROMPT_PROTOCOL),
        settings={
            "batch_size": batch_size,
            "generation": generation,
            "case_sensitive": case_sensitive,
            "limit": limit,
            "n_values": list(n_values) if protocol == "sequential" else None,
        },
        versions=versions(),
        time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        runs=runs,
        wall_s=wall,
        records_per_s=n_scored / wall if wall > 0 else float("inf"),
    )
    logger.info(
        "%s on %s (%s, %s scorer): %d records in %.1f s", editor.name, path.name, protocol, scorer,
        n_scored, wall,
    )
    return results


def _editor_options(editor: Editor) -> dict[str, Any]:
    """The editor's config for results.json, with the folder it was loaded from (if any)."""
    options = editor.config_dict()
    if editor.source is not None:
        options["pretrained"] = editor.source
    return options
