"""`LayerCapture`: keep some decoder layers' outputs during one forward and stop after the last
(used to store an edit's states and to read the gate's decision without running the rest)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dualedit.backbones import Backbone, layer_output_tensor


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass after the last layer it needs."""


class LayerCapture:
    """Keep the outputs of some decoder layers during one forward, and stop after the last.

    Its own hooks, registered on enter and removed on exit; layers after the last captured one
    never run.

    Example:
        >>> with LayerCapture(model, backbone, [16, 19]) as capture:
        ...     capture.run(lambda: model(**inputs))
        >>> capture.outputs[16].shape  # [batch, seq, hidden]
    """

    def __init__(self, model: nn.Module, backbone: Backbone, layers: Sequence[int]):
        self.model = model
        self.backbone = backbone
        self.layers = sorted(set(layers))
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> LayerCapture:
        for index in self.layers:
            layer = self.backbone.layer(self.model, index)
            self._handles.append(layer.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc: object) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _hook(self, index: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[index] = layer_output_tensor(output).detach()
            if index == self.layers[-1]:
                raise _StopForward

        return hook

    def run(self, forward: Callable[[], Any]) -> dict[int, torch.Tensor]:
        """Call `forward()` (a model forward) until the last captured layer; returns `outputs`.

        Raises:
            RuntimeError: the forward ended without reaching the last captured layer.
        """
        self.outputs.clear()
        try:
            forward()
        except _StopForward:
            return self.outputs
        raise RuntimeError(f"the forward finished without running decoder layer {self.layers[-1]}")
