"""Checks of a saved edit memory's index (`memory.json`) beyond the store's own: the per-edit
lengths against the memory's text_keys, and the format and model fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Formats of memory.json this version reads (`memory.MEMORY_FORMAT` is the newest).
READABLE_FORMATS = (1, 2, 3, 4, 5)
#: What the states belong to: saved in memory.json and checked when a file is read.
MODEL_FIELDS = ("hidden_size", "text_layer", "visual_layer", "model_type", "text_keys")


def check_lengths(index: dict[str, Any], path: Path) -> None:
    """Per edit, the text layer keeps every position of the visual layer's ("all"), its
    non-image ones ("text": fewer by the model's image positions, the same for every edit with
    an image), or the last prompt token and the target ("answer": fewer, by a count that depends
    on the prompt): lengths that break this belong to other edits (swapped, shifted). Under
    "answer" only a text count above the visual one shows; the checksums catch real damage."""
    text, visual = index.get("text_lengths"), index.get("visual_lengths")
    if not (isinstance(text, list) and isinstance(visual, list)) or len(text) != len(visual):
        return  # the store names what is wrong with the lists themselves
    if not all(isinstance(n, int) for n in text + visual):
        return
    gaps = [v - t for t, v in zip(text, visual, strict=True)]
    image_gaps = sorted({g for g in gaps if g})
    for i, gap in enumerate(gaps):
        if index["text_keys"] == "all":
            wrong = gap != 0
        elif index["text_keys"] == "answer":  # the prompt's positions but its last: any count
            wrong = gap < 0
        else:
            wrong = gap < 0 or (gap and len(image_gaps) > 1)
        if wrong:
            raise ValueError(
                f"{path}: edit {i} keeps {text[i]} text and {visual[i]} visual positions, which "
                f"does not fit text_keys {index['text_keys']!r} (the lengths belong to other "
                "edits: the index is damaged)"
            )


def check_index(index: dict[str, Any], path: Path) -> dict[str, Any]:
    index = dict(index)
    if index.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path}: not an edit memory index of format {READABLE_FORMATS}")
    if index["format"] == 1:
        index.setdefault("text_keys", "all")  # format 1 always stored every position
    missing = [name for name in MODEL_FIELDS if name not in index]  # the store checks the rest
    if index["format"] >= 4 and "files" not in index:
        missing.append("files")
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}")
    return index
