"""Training LTE's LoRA: `LTETrainable` (what the one training loop needs from LTE) and
`train_lte` (the loop run for it).

Each step takes an `EditBatch` of n edits; every row of edit i reads edit i's own fact (its rel
sample's prompt and new answer, in the editor's template) before its question, as evaluation's
single-edit protocol prefixes the one edit held. The loss follows LiveEdit's `lte_vl`:

    l_rel + l_gen + 0.5 * (l_loc + l_loc_plain)

l_rel, l_gen: the NLL of the new answer on the rel rows and on the t_gen and v_gen rows, with
the fact; l_loc: KL(base without the fact || LoRA model with the fact) and l_loc_plain:
KL(base without the fact || LoRA model without it), each on the m_loc rows and (with
`text_loc_kl`) the t_loc rows. The reference is the base model (LoRA off) on the unprefixed rows,
under no_grad. The LoRA changes layers >= `first_layer` only, so each input's layers below it
run once without gradient (`Backbone.layer_input`), and logits are computed only at the target
positions.

Validation (no_grad): Rel / T-Gen / V-Gen token accuracy with the fact, and M-Loc / T-Loc
agreement of the LoRA model with the fact against the base without it (what the single-edit
evaluation measures), in `train.losses.METRICS` order.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from dualedit.backbones import Backbone, get_backbone
from dualedit.data.mmedit import MMEditDataset
from dualedit.data.prompts import EncodedBatch, select_rows
from dualedit.data.requests import edit_request
from dualedit.editors.lte.editor import LTEConfig, LTEditor
from dualedit.numerics import flush_denormals
from dualedit.options import config_from_dict
from dualedit.editors.trained import EditorTrainable
from dualedit.train.data import EditBatch
from dualedit.train.devices import place_model
from dualedit.train.loop import train, validation_split
from dualedit.train.losses import METRICS, PassOutput, locality, pass_output
from dualedit.train.settings import TrainResult, TrainSettings

logger = logging.getLogger(__name__)

#: The weight of each locality KL (LiveEdit's lte_vl: the mean of the two).
LOC_WEIGHT = 0.5
#: Settings when none are given: LTE's LoRA learning rate (3e-4), the loop's other defaults.
DEFAULT_SETTINGS = TrainSettings(lr=3e-4)


class LTETrainable(EditorTrainable):
    """LTE's LoRA as the training loop trains it (a `dualedit.train.Trainable`).

    Holds an `LTEditor` attached to `model` (base model frozen, no fact stored: each pass gives
    every row its own edit's fact); `module` is its LoRA. `close()` detaches it.

    Args:
        model, processor: the VLM, already where it trains (`train.devices.place_model`).
        dataset: the split the batches come from (train and validation records alike): each
            edit's fact is its record's request, read from here by `EditBatch.records`.
        config: an `LTEConfig` (or a dict of its fields; None: the defaults).
        text_loc_kl: include the KLs on the text-only locality rows in the loss.
        backbone: where the model's layers are (None: looked up).
    """

    name = LTEditor.name

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        dataset: MMEditDataset,
        *,
        config: LTEConfig | dict[str, Any] | None = None,
        text_loc_kl: bool = True,
        backbone: Backbone | None = None,
    ):
        if not isinstance(text_loc_kl, bool):
            raise TypeError(f"text_loc_kl must be a bool, got {text_loc_kl!r}")
        self.editor = LTEditor(
            model, processor, backbone if backbone is not None else get_backbone(model),
            config=_resolve_config(config),
        )
        self.module: nn.Module = self.editor.lora
        self.dataset = dataset
        self.text_loc_kl = text_loc_kl
        self._prefixes: dict[int, tuple[int, ...]] = {}

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.editor.parameters()

    def prefixes(self, records: Sequence[int]) -> list[tuple[int, ...]]:
        """The fact tokens of each record's edit (cached)."""
        out = []
        for j in records:
            if j not in self._prefixes:
                request = edit_request(self.dataset[j], self.dataset.task)
                self._prefixes[j] = self.editor.fact_of(request).prefix
            out.append(self._prefixes[j])
        return out

    def loss(self, batch: EditBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """l_rel + l_gen + 0.5 * (l_loc + l_loc_plain) (see the module docstring)."""
        self.module.train()  # LoRA dropout, in the loss pass only
        try:
            out, plain = edit_pass(
                self.editor, batch, self.prefixes(batch.records),
                text_loc=self.text_loc_kl, plain=True,
            )
        finally:
            self.module.eval()
        total, terms = out.loss(self.text_loc_kl, LOC_WEIGHT)
        l_plain = sum(kl.mean() for kl in plain.values())
        terms["l_loc_plain"] = l_plain
        return total + LOC_WEIGHT * l_plain, terms

    def metrics(self, batch: EditBatch) -> dict[str, torch.Tensor]:
        """Rel / T-Gen / V-Gen accuracy with the fact, T-Loc / M-Loc agreement of the LoRA model
        with the fact against the base without it, per edit, in `METRICS` order."""
        out, _ = edit_pass(self.editor, batch, self.prefixes(batch.records), text_loc=True)
        metrics = out.metrics()
        return {key: metrics[key] for key in METRICS}

def edit_pass(
    editor: LTEditor,
    batch: EditBatch,
    prefixes: Sequence[Sequence[int]],
    *,
    text_loc: bool = True,
    plain: bool = False,
) -> tuple[PassOutput, dict[str, torch.Tensor]]:
    """One pass over `batch` with every row of edit i reading `prefixes[i]`.

    Gradient flows into the LoRA when grad mode is on; wrap in `torch.no_grad()` to validate.

    Args:
        editor: an attached `LTEditor` (holding no fact) on the model.
        batch: the n edits' samples, on the model's input device.
        prefixes: the n edits' fact tokens.
        text_loc: also run the text-only locality rows.
        plain: also run the locality rows without the fact (the LoRA on) for l_loc_plain.

    Returns:
        (the `PassOutput` of the prefixed pass against the base without the fact,
        {"m_loc"[, "t_loc"]: [n] KL(base || LoRA model without the fact)}, empty unless `plain`).
    """
    n = batch.n
    if len(prefixes) != n:
        raise ValueError(f"{len(prefixes)} prefixes for {n} edits")
    images = batch.images
    per_row = [prefixes[i % n] for i in range(images.input_ids.shape[0])]
    logits = _prefixed_logits(editor, images, per_row)  # [k, vocab]
    loc = select_rows(images, batch.rows("m_loc"))
    reference, plain_logits = _plain_logits(editor, loc, plain)  # [k_loc, vocab] each
    plain_kl: dict[str, torch.Tensor] = {}
    if plain_logits is not None:
        plain_kl["m_loc"], _ = locality(reference, plain_logits, _target_rows(loc), n)
    if not text_loc:
        return pass_output(images, logits, reference, n), plain_kl
    text = batch.text
    text_logits = _prefixed_logits(editor, text, list(prefixes))  # [k_text, vocab]
    text_reference, text_plain = _plain_logits(editor, text, plain)
    if text_plain is not None:
        plain_kl["t_loc"], _ = locality(text_reference, text_plain, _target_rows(text), n)
    out = pass_output(
        images, logits, reference, n,
        text=text, text_logits=text_logits, text_reference=text_reference,
    )
    return out, plain_kl


def _prefixed_logits(
    editor: LTEditor, batch: EncodedBatch, prefixes: Sequence[Sequence[int]]
) -> torch.Tensor:
    """The LoRA model's logits at the target positions of `batch` with row i reading
    `prefixes[i]`: [k, vocab], in the original batch's row-major target order."""
    inner = editor.prefixed_with(batch, prefixes).batch
    return _lora_logits(editor, inner)


def _lora_logits(editor: LTEditor, batch: EncodedBatch) -> torch.Tensor:
    """Logits at `batch.target_mask` with the LoRA on: [k, vocab]."""
    backbone, model, m = editor.backbone, editor.model, editor.first_layer
    with torch.no_grad():  # the layers below the LoRA's first: once, no graph
        hidden = backbone.layer_input(
            model, m, batch.input_ids, batch.attention_mask, batch.pixel_values
        )  # [rows, seq, hidden]
    with editor.lora_forced():
        return backbone.run_from(
            model, m, hidden, batch.attention_mask, logits_at=batch.target_mask
        )


def _plain_logits(
    editor: LTEditor, batch: EncodedBatch, with_lora: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the base model's logits at `batch.target_mask`, no gradient; the LoRA model's there
    when `with_lora`, else None), both on the unprefixed rows."""
    backbone, model, m = editor.backbone, editor.model, editor.first_layer
    with torch.no_grad():
        hidden = backbone.layer_input(
            model, m, batch.input_ids, batch.attention_mask, batch.pixel_values
        )  # [rows, seq, hidden]
        with editor.disabled():
            reference = backbone.run_from(
                model, m, hidden, batch.attention_mask, logits_at=batch.target_mask
            )  # [k, vocab]
    if not with_lora:
        return reference, None
    with editor.lora_forced():
        edited = backbone.run_from(
            model, m, hidden, batch.attention_mask, logits_at=batch.target_mask
        )
    return reference, edited


def _target_rows(batch: EncodedBatch) -> torch.Tensor:
    return batch.target_mask.nonzero()[:, 0]  # [k] the row of each target position


@flush_denormals()  # subnormal floats slow CPU training many times over (numerics.py)
def train_lte(
    model: nn.Module,
    processor: Any,
    train_dataset: MMEditDataset,
    *,
    config: LTEConfig | dict[str, Any] | None = None,
    settings: TrainSettings | None = None,
    out_dir: str | Path,
    val_fraction: float | None = None,
    resume: bool = True,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    **ignored: Any,
) -> TrainResult:
    """Train LTE's LoRA on `model` (frozen) and keep the best by validation.

    Args:
        model: the VLM; its weights are never changed (only `requires_grad` flags while training,
            given back at the end); moved to `accelerator.device` unless already there or
            sharded.
        processor: its processor.
        train_dataset: the train split; validation edits are a fixed selection of it.
        config: an `LTEConfig` (or a dict of its fields).
        settings: `TrainSettings` (default: `DEFAULT_SETTINGS`, LTE's LoRA rate 3e-4);
            `text_loc_kl` includes the text-only locality KLs in the loss.
        out_dir, val_fraction, resume, progress, accelerator: as `dualedit.train.loop.train`.
        **ignored: options of other methods' trainers (e.g. DualEdit's `calibrate_tau`), which
            LTE has no use for.

    Returns:
        A `TrainResult`; `best_dir` is a folder `LTEditor.from_pretrained` loads.

    Example:
        >>> result = train_lte(model, processor, load_split("world", "vqa", "train"),
        ...                    config={"lora_r": 16}, out_dir="runs/lte")
        >>> editor = LTEditor.from_pretrained(model, processor, result.best_dir)
    """
    started = time.perf_counter()
    if ignored:
        logger.debug("train_lte: options of other trainers ignored: %s", sorted(ignored))
    settings = settings if settings is not None else DEFAULT_SETTINGS
    if not isinstance(settings, TrainSettings):
        raise TypeError(f"settings must be a TrainSettings, got {type(settings).__name__}")
    config = _resolve_config(config)
    if accelerator is None:
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    validation_split(
        train_dataset, settings, val_fraction=val_fraction, processes=accelerator.num_processes
    )
    place_model(model, accelerator)
    trainable = LTETrainable(
        model, processor, train_dataset, config=config, text_loc_kl=settings.text_loc_kl
    )
    result = train(
        trainable,
        model,
        processor,
        train_dataset,
        settings=settings,
        out_dir=out_dir,
        val_fraction=val_fraction,
        resume=resume,
        progress=progress,
        accelerator=accelerator,
    )
    return dataclasses.replace(result, seconds=time.perf_counter() - started)


def _resolve_config(config: LTEConfig | dict[str, Any] | None) -> LTEConfig:
    if config is None:
        return LTEConfig()
    if isinstance(config, dict):
        return config_from_dict(LTEConfig, config, where="train lte config")
    if not isinstance(config, LTEConfig):
        raise TypeError(f"lte config: an LTEConfig or a dict, got {type(config).__name__}")
    return config
