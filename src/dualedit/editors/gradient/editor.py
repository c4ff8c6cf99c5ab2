"""`GradientEditor`: the shared core of the gradient-based weight editors (MEND, KE).

Such a method owns a trained network that reads an edit's fine-tuning gradient at some linear
maps of the language model (the "targets", e.g. the MLP maps of the last layers) and returns a
weight update of each: for a linear map W the gradient of the edit's NLL is sum_p delta_p x_p^T
over positions p (input x_p, output gradient delta_p; `capture.LinearTrace`), and the network
turns those factors into the update's (`lowrank.Factors`). `apply` computes the update of the
requests under the current weights and adds it to them (edits accumulate; a later edit's
gradient is taken on the edited model, as the sequential protocol runs MEND); `restore` copies the
original tensors back (`weights.WeightSnapshot`); one edit cannot be removed alone.

A method says what its network is (`build_network`) and how it transforms one batch's factors
(`transform`); the trainer (train.py) trains `network` through the same two calls.

Folders: `adapter_model.safetensors` holds the network ("network.<name>") and, once edits are
applied, the edited targets ("edited.<target>.weight").
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dualedit.backbones import Backbone
from dualedit.data.prompts import EncodedBatch, encode
from dualedit.data.requests import EditRequest
from dualedit.editors.base import EditId, Editor, ImageLoader
from dualedit.editors.capture import LinearTrace
from dualedit.editors.defaults import SMALL_DEPTH
from dualedit.editors.lowrank import Factors, RowUpdates
from dualedit.editors.weights import WeightEdits, check_tensors
from dualedit.train.losses import PassOutput
from dualedit.editors.finetune.core import TunedTensors

NETWORK_PREFIX = "network."
EDITED_PREFIX = "edited."


#: The MLP maps the multimodal ports of MEND and KE edit (EasyEdit's and VLKEB's configs: OPT
#: fc1/fc2, LLaMA up_proj/down_proj of layers 29-31 of 32).
MLP_WEIGHTS: dict[str, tuple[str, ...]] = {
    "llava": ("up_proj", "down_proj"),
    "blip-2": ("fc1", "fc2"),
}


def check_targets(where: str, layers: Any, weights: Any) -> tuple[Any, Any]:
    """Validated `layers` (None or ints) and `weights` (None or names) as tuples."""
    if layers is not None:
        layers = tuple(layers) if isinstance(layers, (list, tuple)) else (layers,)
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise ValueError(f"{where} option layers: ints (decoder layers), got {layers!r}")
    if weights is not None:
        weights = tuple(weights) if isinstance(weights, (list, tuple)) else (weights,)
        if not weights or any(not isinstance(w, str) or not w for w in weights):
            raise ValueError(f"{where} option weights: MLP map names, got {weights!r}")
    return layers, weights


def row_nll(logits: torch.Tensor, batch: EncodedBatch) -> torch.Tensor:
    """Each row's mean NLL of its target tokens, summed over rows (rows' gradients stay apart).

    logits: [k, vocab] at `batch.target_mask` (row-major)."""
    rows = batch.target_mask.nonzero()[:, 0]  # [k]
    nll = F.cross_entropy(logits.float(), batch.target_ids[batch.target_mask], reduction="none")
    count = torch.bincount(rows, minlength=batch.input_ids.shape[0]).clamp_min(1)  # [n]
    return (nll / count[rows].to(nll.dtype)).sum()


class GradientEditor(WeightEdits, Editor):
    """Base of MEND and KE (see the module docstring).

    The method's config has `layers` (decoder layers; None: the last `DEFAULT_LAST` of the
    backbone's scale), `weights` (MLP map names of `Backbone.mlp_linears`; None: all) and
    `batch_size` (edits per gradient forward in `apply`).
    """

    #: {model type: MLP map names} edited when the config names none (a type not listed: all).
    DEFAULT_WEIGHTS: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: {"small", "real"}: how many of the last decoder layers are edited by default.
    DEFAULT_LAST: ClassVar[dict[str, int]] = {"small": 2, "real": 3}

    def __init__(self, model: nn.Module, processor: Any, backbone: Backbone | None = None, **kw):
        super().__init__(model, processor, backbone, **kw)
        depth = self.backbone.depth(model)
        layers = self.config.layers
        if layers is None:
            last = self.DEFAULT_LAST["small" if depth < SMALL_DEPTH else "real"]
            layers = tuple(range(max(0, depth - last), depth))
        self.layers: tuple[int, ...] = tuple(sorted(set(layers)))
        self.targets: dict[str, nn.Linear] = {}
        for layer in self.layers:
            maps = self.backbone.mlp_linears(model, layer)  # validates the layer index
            names = self.config.weights
            if names is None:
                names = self.DEFAULT_WEIGHTS.get(model.config.model_type, tuple(maps))
            unknown = sorted(set(names) - set(maps))
            if unknown:
                raise ValueError(
                    f"{self.name} option weights: {unknown} are not MLP maps of layer {layer} "
                    f"({sorted(maps)})"
                )
            for name in names:
                self.targets[f"{layer}.{name}"] = maps[name]
        parameter = next(model.parameters())
        shapes = {k: (m.in_features, m.out_features) for k, m in self.targets.items()}
        self.network: nn.Module = self.build_network(shapes).to(parameter.device)
        self.edited = TunedTensors({k.replace(".", "_"): m for k, m in self.targets.items()})
        self.row_updates = RowUpdates(self.targets)

    @property
    def first_layer(self) -> int:
        """The first decoder layer an update changes: layers below run unchanged."""
        return self.layers[0]

    def config_dict(self) -> dict[str, Any]:
        """The config with the edited layers resolved."""
        return {**super().config_dict(), "layers": list(self.layers)}

    # -- the method ---------------------------------------------------------------------------

    @abstractmethod
    def build_network(self, shapes: dict[str, tuple[int, int]]) -> nn.Module:
        """The trained network for targets {name: (d_in, d_out)}."""

    @abstractmethod
    def transform(
        self,
        inputs: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        mask: torch.Tensor,
        batch: EncodedBatch,
    ) -> dict[str, Factors]:
        """Each target's update from an edit batch's factors.

        Args:
            inputs: {target: x [n, seq, d_in]}, the maps' inputs on the n edit samples.
            grads: {target: delta [n, seq, d_out]}, the gradients of the edits' NLL w.r.t.
                their outputs (each edit's mean target NLL).
            mask: [n, seq] bool, the real (unpadded) positions.
            batch: the n edit samples (for a method that reads the edit itself, KE).

        Returns:
            {target: Factors with u [n, R, d_in], v [n, R, d_out]}: edit i's update of W is
            v_i^T u_i (sign and step size included).
        """

    @abstractmethod
    def objective(self, out: PassOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one edited pass and its named terms (the same every step)."""

    # -- gradients ----------------------------------------------------------------------------

    def edit_gradients(
        self, batch: EncodedBatch, hidden: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """({target: x}, {target: delta}) of the edit samples `batch` under the current weights.

        Args:
            hidden: [n, seq, hidden], the input of `first_layer` when known (the frozen prefix
                of training); None: run from the input.
        """
        model, backbone, m = self.model, self.backbone, self.first_layer
        with torch.enable_grad(), LinearTrace(self.targets) as trace:
            if hidden is None:
                with torch.no_grad():
                    hidden = backbone.layer_input(
                        model, m, batch.input_ids, batch.attention_mask, batch.pixel_values
                    )
            logits = backbone.run_from(
                model, m, hidden.detach(), batch.attention_mask, logits_at=batch.target_mask
            )  # [k, vocab]
            grads = trace.gradients(row_nll(logits, batch))
        # Some maps see [batch * seq, width] (OPT flattens before its MLP): back to rows.
        n, seq = batch.input_ids.shape
        inputs = {k: x.reshape(n, seq, x.shape[-1]) for k, x in trace.inputs.items()}
        grads = {k: g.reshape(n, seq, g.shape[-1]) for k, g in grads.items()}
        return inputs, grads

    def updates(
        self, batch: EncodedBatch, hidden: torch.Tensor | None = None
    ) -> dict[str, Factors]:
        """The network's update of every target for each edit sample of `batch`."""
        inputs, grads = self.edit_gradients(batch, hidden)
        mask = batch.attention_mask.bool()
        return self.transform(inputs, grads, mask, batch)

    # -- edits --------------------------------------------------------------------------------

    def apply(
        self,
        requests: Sequence[EditRequest],
        images: ImageLoader,
        *,
        ids: Sequence[EditId] | None = None,
    ) -> list[EditId]:
        """Add the network's update of each request to the targets' weights."""
        if not requests:
            return []
        new_ids = self._new_ids(len(requests), ids)
        samples = [request.sample() for request in requests]
        device = next(self.model.parameters()).device
        size = self.config.batch_size
        was_training = self.model.training
        self.model.eval()
        self.network.eval()
        try:
            total: dict[str, torch.Tensor] = {}
            for start in range(0, len(samples), size):
                batch = encode(samples[start : start + size], self.processor, self.backbone, images)
                with torch.no_grad():
                    factors = self.updates(batch.to(device))
                for name, f in factors.items():
                    dense = f.dense()  # [d_out, d_in]
                    total[name] = total[name] + dense if name in total else dense
        finally:
            self.model.train(was_training)
        self.snapshot()  # the originals, before the first update changes them
        with torch.no_grad():
            for name, delta in total.items():
                weight = self.targets[name].weight
                weight.add_(delta.to(weight.dtype))
        self._hold(requests, new_ids)
        return new_ids

    def edited_module(self) -> nn.Module:
        return self.edited

    # -- files --------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The network's tensors and, once edited, the edited weights."""
        tensors = {
            NETWORK_PREFIX + k: v.detach().clone() for k, v in self.network.state_dict().items()
        }
        if self._snapshot is not None:
            tensors.update({EDITED_PREFIX + k: v for k, v in self._snapshot.current().items()})
        return tensors

    def load_state(
        self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str
    ) -> None:
        """The saved network (strict: names and shapes checked) and edited weights."""
        super().load_state(meta, tensors, where)
        network = {k[len(NETWORK_PREFIX):]: v for k, v in tensors.items()
                   if k.startswith(NETWORK_PREFIX)}
        edited = {k[len(EDITED_PREFIX):]: v for k, v in tensors.items()
                  if k.startswith(EDITED_PREFIX)}
        other = sorted(set(tensors) - {NETWORK_PREFIX + k for k in network}
                       - {EDITED_PREFIX + k for k in edited})
        if other:
            raise ValueError(f"{where}: unexpected tensors {other}")
        if not network:
            raise ValueError(f"{where}: no network tensors ({NETWORK_PREFIX}*) in the folder")
        own = self.network.state_dict()
        check_tensors(own, network, where=where)
        self.network.load_state_dict(
            {k: v.to(own[k].device, own[k].dtype) for k, v in network.items()}
        )
        if edited:
            self.snapshot().load(edited, where=where)
