"""One evaluation as a user runs it: load a VLM folder and a dataset, edit, score, write.

The CLI's `eval` and the demo both call `run_eval`; the pieces are in `eval/` and `editors/`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError

from dualedit.data.mmedit import load_split
from dualedit.editors.registry import check_editor_request, get_method, open_editor
from dualedit.eval.harness import evaluate
from dualedit.eval.report import markdown_table, results_dict, write_results
from dualedit.eval.sequential_curves import write_sequential_curves
from dualedit.io import atomic_write_text
from dualedit.eval.results import Results


#: Any one of these makes a folder hold model weights (a single file or a sharded index).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: Any one of these makes a folder hold a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_vlm(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str = "cpu"):
    """Load a VLM folder the transformers way (`AutoModelForImageTextToText` + `AutoProcessor`,
    with the PIL image backend).

    Returns:
        (model in eval mode on `device`, processor)

    Raises:
        FileNotFoundError: `path` has no config.json, no weights or no tokenizer files.
        ValueError: the weights file is damaged (unreadable).
    """
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(
            f"{path}: the model folder has no weights (none of {', '.join(WEIGHT_FILES)})"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path}: the model folder has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save the processor beside the model (processor.save_pretrained)"
        )
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).to(device).eval()
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: the model's weights cannot be read ({error})") from error
    processor = AutoProcessor.from_pretrained(path)
    # The PIL image backend, as the small VLMs were pretrained with: where torchvision is
    # installed, transformers would otherwise pick its backend, whose resize gives other pixels.
    if not type(processor.image_processor).__name__.endswith("Pil"):
        processor.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    return model, processor


#: `split="val"`: the validation edits of the train split, the selection training holds out (for
#: tuning a method's options without touching the eval split).
VAL_SPLIT = "val"


def load_dataset_split(root: str | os.PathLike, task: str, split: str) -> Any:
    """One split of an MMEdit folder: "train", "eval", or "val" (the validation edits that
    training holds out of the train split)."""
    if split != VAL_SPLIT:
        return load_split(root, task, split)
    from dualedit.train.data import split_indices
    from dualedit.train.settings import TrainSettings

    train = load_split(root, task, "train")
    return train.select(split_indices(len(train), TrainSettings().val_edits)[1])


def run_eval(
    *,
    model_path: str | os.PathLike | None = None,
    model_and_processor: tuple[Any, Any] | None = None,
    data_root: str | os.PathLike,
    task: str,
    split: str = "eval",
    method: str | None = "none",
    editor_dir: str | os.PathLike | None = None,
    editor_options: dict[str, Any] | None = None,
    untrained: bool = False,
    ignore_base_mismatch: bool = False,
    protocol: str = "single",
    n_values: Sequence[int] = (1, 10, 100),
    scorer: str = "paper",
    limit: int | None = None,
    batch_size: int = 16,
    generation: bool = True,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Results:
    """Evaluate `method` on one dataset split ("eval", "train", or "val": the train split's
    validation edits) and write `results.json` + `table.md` to `out_dir` (and, under the
    sequential protocol, `sequential.png`: the metrics against N).

    The editor is `open_editor(method=method, directory=editor_dir, options=editor_options,
    untrained=untrained, ignore_base_mismatch=...)`: a trained method needs `editor_dir` (e.g. a `dualedit train` best/
    folder), from which the method is read (`method` may be None then).

    Give either `model_path` (a save_pretrained folder) or an already loaded
    `model_and_processor` (the demo loads each model once for several runs).
    """
    if (model_path is None) == (model_and_processor is None):
        raise ValueError("give exactly one of model_path and model_and_processor")
    check_editor_request(method, editor_dir, untrained)  # before minutes of loading
    if editor_dir is None and method is not None:
        # A method that reads a train split when it edits reads this data folder's.
        editor_options = get_method(method).with_train_data(editor_options, data_root, task)
    model, processor = model_and_processor or load_vlm(model_path)
    dataset = load_dataset_split(data_root, task, split)
    editor = open_editor(
        model,
        processor,
        method=method,
        directory=editor_dir,
        options=editor_options,
        untrained=untrained,
        ignore_base_mismatch=ignore_base_mismatch,
    )
    try:
        results = evaluate(
            model,
            processor,
            dataset,
            editor,
            protocol=protocol,
            scorer=scorer,
            n_values=n_values,
            limit=limit,
            batch_size=batch_size,
            generation=generation,
            progress=progress,
        )
    finally:
        editor.detach()  # hooks and requires_grad flags back: the model serves the next run
    if out_dir is not None:
        out = Path(out_dir)
        write_results(results, out / "results.json")
        atomic_write_text(out / "table.md", markdown_table(results) + "\n")
        if results.protocol == "sequential":
            write_sequential_curves(results_dict(results), out)  # sequential.png, logged
    return results
