"""The fine-tuning family (FT-L, FT-V): fine-tune some of the model's tensors on the edit
samples, everything else frozen, and undo it exactly.

The loss is the mean NLL of the target tokens of the applied requests (image, prompt -> target),
teacher-forced; Adam, a fixed number of full-batch steps, no norm constraint (as the MMEdit
baselines of the DualEdit paper's Table 2). Several requests given to one `apply` are fitted
together; successive `apply` calls keep fine-tuning the already edited tensors (the sequential
protocol). `restore` copies the original tensors back (`weights.WeightSnapshot`), so
`state_dict()` is byte-identical to the unedited model's. A member of the family says only what
it tunes (`targets`) and its per-backbone defaults (`defaults`).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dualedit.backbones import Backbone
from dualedit.data.prompts import encode
from dualedit.data.requests import EditRequest
from dualedit.editors.base import EditId, Editor, ImageLoader
from dualedit.editors.defaults import backbone_defaults
from dualedit.editors.weights import WeightEdits, frozen

logger = logging.getLogger(__name__)

class TunedTensors(nn.Module):
    """The model's modules and parameters a method fine-tunes, gathered under one module (the
    model's own objects, not copies), so that one snapshot and one state dict cover them."""

    def __init__(self, parts: Mapping[str, nn.Module | nn.Parameter]):
        super().__init__()
        for name, part in parts.items():
            if isinstance(part, nn.Parameter):
                self.register_parameter(name, part)
            else:
                self.add_module(name, part)


class FineTuneEditor(WeightEdits, Editor):
    """Base of the fine-tuning methods: fine-tunes `targets()` on the edit samples.

    Saved folders hold the tuned tensors under their names in `targets` ("mlp.down_proj.weight",
    "multi_modal_projector.linear_1.weight", ...). The config must have `steps`, `lr` (None:
    the method's default for the backbone, from `DEFAULTS`) and `batch_size`; `config_dict`
    records the resolved values.
    """

    #: {(model type, scale): {"steps", "lr"}} (`editors.defaults.backbone_defaults`).
    DEFAULTS: ClassVar[dict[tuple[str, str], dict[str, Any]]] = {}

    def __init__(self, model: nn.Module, processor: Any, backbone: Backbone | None = None, **kw):
        super().__init__(model, processor, backbone, **kw)
        defaults = backbone_defaults(self.DEFAULTS, model, self.backbone)
        self.steps = self.config.steps if self.config.steps is not None else defaults["steps"]
        self.lr = self.config.lr if self.config.lr is not None else defaults["lr"]
        self.module = TunedTensors(self.targets())

    @abstractmethod
    def targets(self) -> dict[str, nn.Module | nn.Parameter]:
        """What is fine-tuned: {name: module or parameter of the model}."""

    def config_dict(self) -> dict[str, Any]:
        """The config with steps and lr resolved (saved folders name what was run)."""
        return {**super().config_dict(), "steps": self.steps, "lr": self.lr}

    def apply(
        self,
        requests: Sequence[EditRequest],
        images: ImageLoader,
        *,
        ids: Sequence[EditId] | None = None,
    ) -> list[EditId]:
        """Fine-tune the targets on the samples of `requests` for `steps` Adam steps."""
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
            raise ValueError(f"{self.name}: the {len(requests)} edits have no target tokens to fit")
        new_ids = self._new_ids(len(requests), ids)  # checked before any weight changes
        self.snapshot()  # the originals, before the first edit changes them
        params = list(self.module.parameters())
        was_training = self.model.training
        try:
            self.model.eval()  # no dropout: the edit is a deterministic function of the requests
            with frozen(self.model, params):
                optimizer = torch.optim.Adam(params, lr=self.lr)
                for step in range(self.steps):
                    optimizer.zero_grad(set_to_none=True)
                    total = 0.0
                    for batch in batches:
                        loss = self._target_nll(batch) / n_targets
                        loss.backward()
                        total += loss.item()
                    optimizer.step()
                    logger.debug("%s step %d: target NLL %.4f", self.name, step, total)
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

    def edited_module(self) -> nn.Module:
        return self.module

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The edited tensors (none while nothing is edited)."""
        if self._snapshot is None:
            return {}
        return self._snapshot.current()

    def load_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
        """Write the saved tensors over the model's (the originals are kept for `restore`)."""
        super().load_state(meta, tensors, where)
        if not tensors:
            return
        self.snapshot().load(tensors, where=where)  # names and shapes checked, named
