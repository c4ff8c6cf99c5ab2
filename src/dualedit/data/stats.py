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
    `require_images`: then every referenced image is also decoded, and all the bad ones (missing,
    outside the image root, not an image, truncated) are reported together, each with its file,
    record, field and path.

    Args:
        root: the folder holding vqa/, caption/ and images/.
        require_images: decode every image and raise if any is bad.
        alt_policy: passed to the loader ("strip" or "keep").

    Returns:
        One row per file: file, task, split, records, checked, images, images_found,
        images_missing.

    Raises:
        FileNotFoundError: a file is absent.
        ImageProblems: (with `require_images`) some images are bad; one line per image, naming
            file, record, field and path (the records themselves load and stay usable).
        RecordError: a malformed record.

    Example:
        >>> print(format_stats(dataset_stats("data/mmedit")))
    """
    rows, problems = [], []
    for (task, split), relpath in SPLIT_FILES.items():
        dataset = load_split(root, task, split, alt_policy=alt_policy)
        status: dict[str, bool] = {}
        reasons: dict[str, str | None] = {}
        for index, field, image in dataset.image_refs():
            if image not in status:
                try:
                    status[image] = dataset.images.exists(image)
                except ValueError:  # outside the image root
                    status[image] = False
            if require_images:
                if image not in reasons:
                    reasons[image] = dataset.images.check(image)
                if reasons[image] is not None:
                    problems.append(f"{dataset.path}: record {index}, field {field!r}: {reasons[image]}")
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
    if problems:
        raise ImageProblems(problems)
    return rows


class ImageProblems(ValueError):
    """Bad images of a dataset folder, all of them, one per line (`problems`)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:20]
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} bad image reference(s):\n" + "\n".join(shown) + more)


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
