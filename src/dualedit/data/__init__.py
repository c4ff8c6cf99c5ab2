"""Data layer: MMEdit-format edit files -> validated records -> protocol samples -> model inputs."""

from dualedit.data.prompts import (
    PROMPT_PROTOCOL,
    Sample,
    prompt_protocol,
    question_sample,
    record_samples,
    task_prompt,
)
from dualedit.data.records import EditRecord, RecordError, parse_record

__all__ = [
    "PROMPT_PROTOCOL",
    "EditRecord",
    "RecordError",
    "Sample",
    "parse_record",
    "prompt_protocol",
    "question_sample",
    "record_samples",
    "task_prompt",
]
