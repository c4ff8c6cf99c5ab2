"""Check a dataset folder: load and validate every record of the four files, count its images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dualedit.data.mmedit import SPLIT_FILES, load_split


def dataset_stats(
    root: str | Path, *, require_images: bool = False, alt_policy: str = "strip"
) -> list[dict[str, Any]]:
    """Load and validate the four files of an MMEdit-format folder; count images found/missing.

    Images are counted by distinct path over the fields image, image_rephrase, m_loc (and
    hard_m_loc). Missing images are counted, not errors (the real folder has three), unless
    `require_images`.

    Args:
        root: the folder holding vqa/, caption/ and images/.
        require_images: raise on the first missing image instead of counting it.
        alt_policy: passed to the loader ("strip" or "keep").

    Returns:
        One row per file: file, task, split, records, checked, images, images_found,
        images_missing.

    Raises:
        FileNotFoundError: a file is absent, or (with `require_images`) an image is; the message
            names file, record and field.
        RecordError: a malformed record.

    Example:
        >>> print(format_stats(dataset_stats("/work/shared/data/mmedit")))
    """
    rows = []
    for (task, split), relpath in SPLIT_FILES.items():
        dataset = load_split(root, task, split, alt_policy=alt_policy)
        status: dict[str, bool] = {}
        for index, field, image in dataset.image_refs():
            if image not in status:
                status[image] = dataset.images.exists(image)
            if require_images and not status[image]:
                dataset.image(dataset[index], field)  # raises, naming file, record and field
        found = sum(status.values())
        rows.append(
            {
                "file": relpath,
                "task": task,
                "split": split,
                "records": len(dataset),
                "checked": len(dataset),  # every record was validated when the file loaded
                "images": len(status),
                "images_found": found,
                "images_missing": len(status) - found,
            }
        )
    return rows


_COLUMNS = (
    "file",
    "task",
    "split",
    "records",
    "checked",
    "images",
    "images_found",
    "images_missing",
)


def format_stats(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of `dataset_stats` rows, one line per file plus a header."""
    table = [list(_COLUMNS)] + [[str(row[column]) for column in _COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    lines = []
    for n, line in enumerate(table):
        cells = [
            cell.ljust(width) if i < 3 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)
