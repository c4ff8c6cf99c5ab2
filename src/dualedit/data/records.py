"""One MMEdit edit record: the 11 benchmark fields, its index, and optional hard-locality fields.

The MMEdit files (E-VQA, E-IC) are JSON lists of flat objects with exactly the fields in
`MMEDIT_FIELDS` and no id; a record is identified by its index in the file. The built-in world
may add the three `HARD_FIELDS` (an image of a similar entity with its own question and answer),
all together or none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

MMEDIT_FIELDS: tuple[str, ...] = (
    "src",
    "pred",
    "rephrase",
    "alt",
    "image",
    "image_rephrase",
    "loc",
    "loc_ans",
    "m_loc",
    "m_loc_q",
    "m_loc_a",
)
HARD_FIELDS: tuple[str, ...] = ("hard_m_loc", "hard_m_loc_q", "hard_m_loc_a")
IMAGE_FIELDS: tuple[str, ...] = ("image", "image_rephrase", "m_loc", "hard_m_loc")

AltPolicy = Literal["strip", "keep"]
ALT_POLICIES: tuple[str, ...] = ("strip", "keep")


class RecordError(ValueError):
    """A record of an edit file is malformed; the message names the file, the index and the field.

    Attributes:
        file: the file the record came from (a path or a label such as "<memory>").
        index: the record's position in the file's JSON list.
        field: the offending field, or None when the record itself is wrong (not an object).
    """

    def __init__(self, file: str, index: int, field: str | None, problem: str):
        self.file = str(file)
        self.index = index
        self.field = field
        where = f"{self.file}: record {index}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class EditRecord:
    """One edit: the 11 MMEdit fields, the record's index in its file, optional hard locality.

    `pred` is the model's old answer and `alt` the new target; image fields are paths relative to
    the dataset's image root. `alt` is stored after the dataset's whitespace policy was applied.
    """

    index: int
    src: str
    pred: str
    rephrase: str
    alt: str
    image: str
    image_rephrase: str
    loc: str
    loc_ans: str
    m_loc: str
    m_loc_q: str
    m_loc_a: str
    hard_m_loc: str | None = None
    hard_m_loc_q: str | None = None
    hard_m_loc_a: str | None = None

    def __post_init__(self) -> None:
        present = [getattr(self, name) is not None for name in HARD_FIELDS]
        if any(present) and not all(present):
            raise ValueError(
                f"record {self.index}: hard-locality fields must come together: {list(HARD_FIELDS)}"
            )

    @property
    def has_hard(self) -> bool:
        """Whether the record carries the hard-locality fields."""
        return self.hard_m_loc is not None

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON object in the file format (no index; hard fields only if set)."""
        out = {name: getattr(self, name) for name in MMEDIT_FIELDS}
        if self.has_hard:
            out.update({name: getattr(self, name) for name in HARD_FIELDS})
        return out


def apply_alt_policy(alt: str, policy: str) -> str:
    """The target text for a raw `alt` value under a whitespace policy.

    About one in seven real E-IC `alt` values ends in spaces or a newline (two start with a
    space); "strip" removes leading and trailing whitespace (the target is then scored as
    " " + alt.strip()), "keep" leaves the value as written in the file.

    Example:
        >>> apply_alt_policy("A dog on a sofa. \\n", "strip")
        'A dog on a sofa.'
    """
    if policy == "strip":
        return alt.strip()
    if policy == "keep":
        return alt
    raise ValueError(f"unknown alt_policy {policy!r}; expected one of {ALT_POLICIES}")


def parse_record(raw: Any, *, file: str, index: int, alt_policy: str = "strip") -> EditRecord:
    """Validate one raw JSON record and build an `EditRecord`.

    Args:
        raw: the decoded JSON value at position `index` of the file's list.
        file: the file's path, used in error messages.
        index: the record's position in the list.
        alt_policy: "strip" or "keep" (see `apply_alt_policy`).

    Returns:
        The validated record.

    Raises:
        RecordError: the record is not an object, a field is missing, has the wrong type, is
            empty, is unknown, or only some of the hard-locality fields are present.

    Example:
        >>> rec = parse_record(raw_dict, file="vqa_train.json", index=0)
    """
    if alt_policy not in ALT_POLICIES:
        raise ValueError(f"unknown alt_policy {alt_policy!r}; expected one of {ALT_POLICIES}")
    if not isinstance(raw, dict):
        raise RecordError(file, index, None, f"expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(MMEDIT_FIELDS) - set(HARD_FIELDS))
    if unknown:
        raise RecordError(
            file, index, unknown[0], f"unknown field(s) {unknown}; expected {list(MMEDIT_FIELDS)}"
        )
    for name in MMEDIT_FIELDS:
        if name not in raw:
            raise RecordError(file, index, name, "missing field")
        _check_text(raw[name], file, index, name)
    present_hard = [name for name in HARD_FIELDS if name in raw]
    if present_hard and len(present_hard) != len(HARD_FIELDS):
        missing = next(name for name in HARD_FIELDS if name not in raw)
        raise RecordError(
            file, index, missing, f"hard-locality fields must come together: {list(HARD_FIELDS)}"
        )
    for name in present_hard:
        _check_text(raw[name], file, index, name)
    values = {name: raw[name] for name in MMEDIT_FIELDS + tuple(present_hard)}
    values["alt"] = apply_alt_policy(values["alt"], alt_policy)
    return EditRecord(index=index, **values)


def _check_text(value: Any, file: str, index: int, name: str) -> None:
    if not isinstance(value, str):
        raise RecordError(file, index, name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(file, index, name, "empty string")
