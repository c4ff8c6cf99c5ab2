"""FT-L: fine-tune one late language-model MLP on the edit samples, everything else frozen.

The baseline of the DualEdit paper's Table 2 ("fine-tune a late language-model layer"). The loss
is the mean NLL of the target tokens of each applied record's Rel sample (image, src -> alt),
teacher-forced; Adam, a fixed number of full-batch steps, no norm constraint. Several records
given to one `apply` are fitted together; successive `apply` calls keep fine-tuning the already
edited weights (the sequential protocol). `restore` copies that MLP's original tensors back, so
`state_dict()` is byte-identical to the unedited model's.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dualedit.backbones import Backbone
from dualedit.data.prompts import encode, record_samples
from dualedit.data.records import EditRecord
from dualedit.editors.base import Editor, ImageLoader

logger = logging.getLogger(__name__)


class FineTuneLayer(Editor):
    """FT-L on decoder layer `layer`'s MLP (default: the last-but-one decoder layer)."""

    name = "ft-l"
    batched = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        """layer: 0-based decoder layer, None = depth - 2; steps: Adam steps per `apply`;
        lr: learning rate; batch_size: Rel samples per forward (gradients accumulate)."""

        layer: int | None = None
        steps: int = 20
        lr: float = 5e-4
        batch_size: int = 8

        def __post_init__(self) -> None:
            layer = self.layer
            if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
                raise ValueError(f"ft-l option layer: expected an int or None, got {self.layer!r}")
            for name in ("steps", "batch_size"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"ft-l option {name}: expected a positive int, got {value!r}")
            if not isinstance(self.lr, (int, float)) or not self.lr > 0:
                raise ValueError(f"ft-l option lr: expected a positive number, got {self.lr!r}")

    def __init__(self, model: nn.Module, processor: Any, backbone: Backbone, **options: Any):
        super().__init__(model, processor, backbone, **options)
        depth = backbone.depth(model)
        self.layer = self.options.layer if self.options.layer is not None else max(depth - 2, 0)
        self.module = backbone.mlp(model, self.layer)  # validates the layer index
        self._original: dict[str, torch.Tensor] | None = None

    def option_dict(self) -> dict[str, Any]:
        return {**super().option_dict(), "resolved_layer": self.layer}

    def apply(self, records: Sequence[EditRecord], task: str, images: ImageLoader) -> None:
        """Fine-tune the MLP on the Rel samples of `records` for `steps` Adam steps."""
        if not records:
            return
        if self._original is None:
            self._original = {
                name: tensor.detach().clone()
                for name, tensor in self.module.state_dict(keep_vars=True).items()
            }
        samples = [record_samples(record, task)["rel"] for record in records]
        size = self.options.batch_size
        batches = [
            encode(samples[start : start + size], self.processor, self.backbone, images)
            for start in range(0, len(samples), size)
        ]
        n_targets = sum(int(batch.target_mask.sum()) for batch in batches)
        if n_targets == 0:
            raise ValueError(
                f"ft-l: records {[r.index for r in records][:5]} have no target tokens to fit"
            )
        params = list(self.module.parameters())
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        was_training = self.model.training
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            self.model.eval()  # no dropout: the edit is a deterministic function of the records
            optimizer = torch.optim.Adam(params, lr=self.options.lr)
            for step in range(self.options.steps):
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for batch in batches:
                    loss = self._target_nll(batch) / n_targets
                    loss.backward()
                    total += loss.item()
                optimizer.step()
                logger.debug("ft-l layer %d step %d: target NLL %.4f", self.layer, step, total)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            for p in params:
                p.grad = None
            self.model.train(was_training)

    def _target_nll(self, batch: Any) -> torch.Tensor:
        """Summed NLL of the target tokens of one encoded batch."""
        device = next(self.model.parameters()).device
        pixel_values = batch.pixel_values.to(device) if batch.pixel_values is not None else None
        logits = self.backbone.forward_logits(
            self.model,
            batch.input_ids.to(device),
            batch.attention_mask.to(device),
            pixel_values,
        )  # [b, s, V]; logits at p predict token p + 1
        return F.cross_entropy(
            logits.flatten(0, 1).float(),  # [b * s, V]
            batch.target_ids.to(device).flatten(),  # [b * s], -100 off target
            ignore_index=-100,
            reduction="sum",
        )

    def restore(self) -> None:
        """Copy the MLP's original tensors back (byte-identical `state_dict()`)."""
        if self._original is None:
            return
        with torch.no_grad():
            for name, tensor in self.module.state_dict(keep_vars=True).items():
                tensor.copy_(self._original[name])
        self._original = None
