"""FT-L: fine-tune one late language-model MLP on the edit samples, everything else frozen.

The baseline of the DualEdit paper's Table 2 ("fine-tune a late language-model layer"). The loss
is the mean NLL of the target tokens of the applied requests (image, prompt -> target),
teacher-forced; Adam, a fixed number of full-batch steps, no norm constraint. Several requests
given to one `apply` are fitted together; successive `apply` calls keep fine-tuning the already
edited weights (the sequential protocol). `restore` copies that MLP's original tensors back
(`weights.WeightSnapshot`), so `state_dict()` is byte-identical to the unedited model's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dualedit.backbones import Backbone
from dualedit.data.prompts import encode
from dualedit.data.requests import EditRequest
from dualedit.editors.base import EditId, Editor, ImageLoader
from dualedit.editors.spec import MethodSpec
from dualedit.editors.weights import WeightSnapshot, frozen

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FineTuneConfig:
    """FT-L options.

    Attributes:
        layer: 0-based decoder layer whose MLP is fine-tuned; None = depth - 2.
        steps: Adam steps per `apply`.
        lr: learning rate.
        batch_size: edit samples per forward (gradients accumulate over the batches).
    """

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
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"ft-l option lr: expected a positive number, got {self.lr!r}")


class FineTuneLayer(Editor):
    """FT-L on decoder layer `layer`'s MLP (default: the last-but-one decoder layer)."""

    name = "ft-l"
    Config = FineTuneConfig

    def __init__(self, model: nn.Module, processor: Any, backbone: Backbone | None = None, **kw):
        super().__init__(model, processor, backbone, **kw)
        depth = self.backbone.depth(model)
        self.layer = self.config.layer if self.config.layer is not None else max(depth - 2, 0)
        self.module = self.backbone.mlp(model, self.layer)  # validates the layer index
        self._snapshot: WeightSnapshot | None = None

    def config_dict(self) -> dict[str, Any]:
        """The config with the layer resolved (saved folders name the layer they edited)."""
        return {**super().config_dict(), "layer": self.layer}

    def apply(
        self,
        requests: Sequence[EditRequest],
        images: ImageLoader,
        *,
        ids: Sequence[EditId] | None = None,
    ) -> list[EditId]:
        """Fine-tune the MLP on the samples of `requests` for `steps` Adam steps."""
        if not requests:
            return []
        samples = [request.sample() for request in requests]
        size = self.config.batch_size
        batches = [
            encode(samples[start : start + size], self.processor, self.backbone, images)
            for start in range(0, len(samples), size)
        ]
        n_targets = sum(int(batch.target_mask.sum()) for batch in batches)
        if n_targets == 0:
            raise ValueError(f"ft-l: the {len(requests)} edits have no target tokens to fit")
        new_ids = self._new_ids(len(requests), ids)  # checked before any weight changes
        if self._snapshot is None:
            self._snapshot = WeightSnapshot(self.module)
        params = list(self.module.parameters())
        was_training = self.model.training
        try:
            self.model.eval()  # no dropout: the edit is a deterministic function of the requests
            with frozen(self.model, params):
                optimizer = torch.optim.Adam(params, lr=self.config.lr)
                for step in range(self.config.steps):
                    optimizer.zero_grad(set_to_none=True)
                    total = 0.0
                    for batch in batches:
                        loss = self._target_nll(batch) / n_targets
                        loss.backward()
                        total += loss.item()
                    optimizer.step()
                    logger.debug("ft-l layer %d step %d: target NLL %.4f", self.layer, step, total)
        finally:
            self.model.train(was_training)
        self._hold(requests, new_ids)
        return new_ids

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
        if self._snapshot is not None:
            self._snapshot.restore()
            self._snapshot = None
        self._held = []

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """The MLP's original tensors for the block, the edited ones after."""
        if self._snapshot is None:
            return contextlib.nullcontext()
        return self._snapshot.swapped()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The edited MLP's tensors (none while nothing is edited)."""
        if self._snapshot is None:
            return {}
        return {f"mlp.{name}": t for name, t in self._snapshot.current().items()}

    def load_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
        """Write the saved MLP tensors over the model's (the originals are kept for `restore`)."""
        super().load_state(meta, tensors, where)
        if not tensors:
            return
        if any(not name.startswith("mlp.") for name in tensors):
            raise ValueError(f"{where}: ft-l tensors must be named mlp.*, got {sorted(tensors)}")
        snapshot = WeightSnapshot(self.module)
        snapshot.load({name[4:]: t for name, t in tensors.items()}, where=where)
        self._snapshot = snapshot


METHOD = MethodSpec(
    name=FineTuneLayer.name,
    editor=FineTuneLayer,
    summary="fine-tune one late language-model MLP on the edit (Adam, fixed steps); untrained",
)
