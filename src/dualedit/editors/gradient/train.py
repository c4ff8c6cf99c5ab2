"""Training a gradient-based editor's network (MEND, KE) with the one training loop.

Per `EditBatch` of n edits (`gradient_pass`):
1. the frozen prefix: the input of the first edited layer m for every row, once, no gradient;
2. each edit's gradient factors at the edited maps, from its edit sample (the rel rows), and the
   network's update of each map (the only part that builds a graph into the network);
3. the edited forward from layer m, row i with edit i's update (`lowrank.RowUpdates`), and the
   unedited reference for the locality rows;
4. `train.losses.pass_output`: the per-edit NLL / accuracy of the new answer and the locality KL
   / agreement, which the method weighs into its loss (`GradientEditor.objective`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from dualedit.data.mmedit import MMEditDataset
from dualedit.data.prompts import select_rows
from dualedit.editors.gradient.editor import GradientEditor
from dualedit.numerics import flush_denormals
from dualedit.editors.trained import EditorTrainable
from dualedit.train.data import EditBatch
from dualedit.train.devices import place_model
from dualedit.train.loop import train, validation_split
from dualedit.train.losses import METRICS, PassOutput, pass_output
from dualedit.train.settings import TrainResult, TrainSettings
from dualedit.editors.weights import freeze


def gradient_pass(editor: GradientEditor, batch: EditBatch) -> PassOutput:
    """The edited pass of `batch` (see the module docstring); gradient flows into the network
    when grad mode is on."""
    model, backbone, m, n = editor.model, editor.backbone, editor.first_layer, batch.n
    images, text = batch.images, batch.text
    loc = batch.rows("m_loc")
    with torch.no_grad():
        hidden = backbone.layer_input(
            model, m, images.input_ids, images.attention_mask, images.pixel_values
        )  # [4n, seq, hidden]
        text_hidden = backbone.layer_input(model, m, text.input_ids, text.attention_mask)
        reference = backbone.run_from(
            model, m, hidden[loc], images.attention_mask[loc], logits_at=images.target_mask[loc]
        )  # [k_loc, vocab]
        text_reference = backbone.run_from(
            model, m, text_hidden, text.attention_mask, logits_at=text.target_mask
        )  # [k_text, vocab]
    rel = batch.rows("rel")
    factors = editor.updates(select_rows(images, rel), hidden[rel])  # {target: [n, R, ...]}
    each = torch.arange(n, device=hidden.device).repeat(images.input_ids.shape[0] // n)
    with editor.row_updates.applied({k: f.select(each) for k, f in factors.items()}):
        logits = backbone.run_from(
            model, m, hidden, images.attention_mask, logits_at=images.target_mask
        )  # [k, vocab]
    with editor.row_updates.applied(factors):
        text_logits = backbone.run_from(
            model, m, text_hidden, text.attention_mask, logits_at=text.target_mask
        )  # [k_text, vocab]
    return pass_output(
        images, logits, reference, n,
        text=text, text_logits=text_logits, text_reference=text_reference,
    )


class GradientTrainable(EditorTrainable):
    """A gradient-based editor's network as the training loop trains it (a `Trainable`).

    The base model is frozen (flags given back on `close`); `module` is the editor's network.

    Args:
        editor: a `GradientEditor` (MEND, KE) on the model, where it trains.
    """

    def __init__(self, editor: GradientEditor):
        self.editor = editor
        self.name = editor.name
        self.module: nn.Module = editor.network
        self.module.train()
        self._flags = freeze(editor.model, self.module.parameters())

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(list(self.module.parameters()))

    def parameter_lrs(self) -> dict[str, float]:
        """The method's own rates for some of its parameters (MEND's step sizes)."""
        return getattr(self.editor, "parameter_lrs", lambda: {})()

    def loss(self, batch: EditBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.editor.objective(gradient_pass(self.editor, batch))

    def metrics(self, batch: EditBatch) -> dict[str, torch.Tensor]:
        """Rel / T-Gen / V-Gen accuracy and T-Loc / M-Loc agreement of the edited model, per
        edit (each edit alone: its own update)."""
        metrics = gradient_pass(self.editor, batch).metrics()
        return {key: metrics[key] for key in METRICS}

@flush_denormals()  # subnormal floats slow CPU training many times over (numerics.py)
def train_gradient_editor(
    model: nn.Module,
    processor: Any,
    train_dataset: MMEditDataset,
    *,
    editor_class: type[GradientEditor],
    config: Any = None,
    settings: TrainSettings | None = None,
    out_dir: str | Path,
    val_fraction: float | None = None,
    resume: bool = True,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    **ignored: Any,
) -> TrainResult:
    """Train a gradient-based editor's network on the train split; keep the best by validation.

    Args:
        editor_class: the method's `GradientEditor` subclass.
        config: its config (instance or dict; None: the defaults).
        Others as `dualedit.train.loop.train`.

    Returns:
        The `TrainResult`; `best_dir` loads with `load_editor`.
    """
    started = time.perf_counter()
    settings = settings if settings is not None else TrainSettings()
    if accelerator is None:
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    validation_split(
        train_dataset, settings, val_fraction=val_fraction, processes=accelerator.num_processes
    )
    config = editor_class.make_config(config)  # refused before the model moves
    place_model(model, accelerator)
    trainable = GradientTrainable(editor_class(model, processor, config=config))
    result = train(
        trainable, model, processor, train_dataset, settings=settings, out_dir=out_dir,
        val_fraction=val_fraction, resume=resume, progress=progress, accelerator=accelerator,
    )
    return dataclasses.replace(result, seconds=time.perf_counter() - started)
