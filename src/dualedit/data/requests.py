"""`EditRequest`: all an editing method learns about an edit (image, prompt, new answer).

The harness turns each benchmark record into one request (`edit_request`) and keeps the record's
rephrase and locality fields for the scorers: a method never sees what it is scored on.
"""

from __future__ import annotations

from dataclasses import dataclass

from dualedit.data.prompts import Sample, target_text, task_prompt
from dualedit.data.records import EditRecord


@dataclass(frozen=True)
class EditRequest:
    """One edit as a user states it.

    Attributes:
        image: the image's key for the image loader given beside the requests (for a dataset: its
            path relative to the image root), or None for a text-only edit.
        prompt: the prompt as the model reads it (the protocol prompt, without the image
            placeholder or chat template), e.g. "What colour is the ball? The answer is:".
        target: the new answer, without the leading space the model reads before it ("blue").

    Example:
        >>> EditRequest("val2014/x.jpg", "What is it? The answer is:", "a dog").sample().target
        ' a dog'
    """

    image: str | None
    prompt: str
    target: str

    def __post_init__(self) -> None:
        if self.image is not None and not isinstance(self.image, str):
            raise TypeError(f"EditRequest.image: a string key or None, got {type(self.image)}")
        if not isinstance(self.prompt, str):
            raise TypeError(f"EditRequest.prompt: a string, got {type(self.prompt).__name__}")
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError(f"EditRequest.target: a non-empty string, got {self.target!r}")

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def sample(self) -> Sample:
        """The teacher-forced edit sample: prompt -> " " + target."""
        return Sample(self.image, self.prompt, target_text(self.target))


def edit_request(record: EditRecord, task: str) -> EditRequest:
    """The request of a benchmark record: (image, protocol prompt of `src`, `alt`).

    `edit_request(r, task).sample()` is the record's Rel sample (`record_samples(r, task)["rel"]`).
    """
    return EditRequest(record.image, task_prompt(task, record.src), record.alt)


def edit_requests(records: list[EditRecord] | tuple[EditRecord, ...], task: str) -> list[EditRequest]:
    """`edit_request` of each record, in order."""
    return [edit_request(record, task) for record in records]
