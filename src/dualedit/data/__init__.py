"""Data layer: MMEdit-format edit files -> validated records -> protocol samples -> model inputs."""

from dualedit.data.mmedit import ImageStore, MMEditDataset, load_split, split_path
from dualedit.data.prompts import (
    PROMPT_PROTOCOL,
    EncodedBatch,
    PromptBatch,
    Sample,
    encode,
    encode_prompts,
    group_by_image,
    prompt_protocol,
    question_sample,
    record_samples,
    task_prompt,
)
from dualedit.data.records import EditRecord, RecordError, parse_record
from dualedit.data.stats import dataset_stats, format_stats

__all__ = [
    "PROMPT_PROTOCOL",
    "EditRecord",
    "EncodedBatch",
    "ImageStore",
    "MMEditDataset",
    "PromptBatch",
    "RecordError",
    "Sample",
    "dataset_stats",
    "encode",
    "encode_prompts",
    "format_stats",
    "group_by_image",
    "load_split",
    "parse_record",
    "prompt_protocol",
    "question_sample",
    "record_samples",
    "split_path",
    "task_prompt",
]
