"""`LayerTrace`: read, replace or stop at some decoder layers' outputs during a forward.

One small tracing object for every method and analysis that needs layer outputs (in the spirit
of baukit's `Trace`/`TraceDict`): storing an edit's hidden states (retain + stop), running an
edited layer without adapters of one's own (edit), gradients with respect to layer outputs for
MEND-style methods and the layer analyses (retain_grad). Its hooks are its own (a `HookSet`),
registered on enter and removed on exit; the layers are found through the backbone
(`backbone.layer(model, i)`), never by module names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dualedit.backbones import Backbone, layer_output_tensor, replace_layer_output
from dualedit.editors.hooks import HookSet

#: `edit(layer_index, output) -> new output`: a new [batch, seq, hidden] tensor, never the input
#: written in place.
EditOutput = Callable[[int, torch.Tensor], torch.Tensor]


class _StopForward(Exception):
    """Raised by a trace hook to end a forward pass after the last traced layer."""


class LayerTrace:
    """Trace the outputs of some decoder layers during a forward.

    Args:
        model: the VLM.
        backbone: its backbone (where the decoder layers are).
        layers: decoder layer indices (0-based) to trace.
        retain: keep each traced layer's output in `outputs[i]` (after `edit`), detached unless
            `retain_grad`; each forward overwrites the previous one's.
        edit: called as `edit(i, output)`; what it returns replaces layer i's output (return
            `output` itself to leave it unchanged).
        stop: end the forward after the last traced layer (use `run`); layers after it and the
            head never run.
        retain_grad: keep the outputs attached to the graph and `retain_grad()` them, so that
            `outputs[i].grad` holds the gradient after a backward. An output that does not
            require grad (a frozen model) is replaced by a detached copy that does (same values),
            so the gradient with respect to it is available too. Needs grad mode on.

    Hooks registered before the trace's (e.g. an editor's) run first on a layer: the trace sees
    their output.

    Example:
        >>> with LayerTrace(model, backbone, [16, 19], stop=True) as trace:
        ...     trace.run(lambda: model(**inputs))
        >>> trace.outputs[16].shape  # [batch, seq, hidden]
        >>> with LayerTrace(model, backbone, [4], edit=lambda i, h: h * 0.5):
        ...     halved = model(**inputs).logits
    """

    def __init__(
        self,
        model: nn.Module,
        backbone: Backbone,
        layers: Sequence[int],
        *,
        retain: bool = True,
        edit: EditOutput | None = None,
        stop: bool = False,
        retain_grad: bool = False,
    ):
        self.layers = sorted(set(layers))
        if not self.layers:
            raise ValueError("LayerTrace: no layers given")
        self._modules = [backbone.layer(model, index) for index in self.layers]
        self.model = model
        self.backbone = backbone
        self.retain = retain or retain_grad
        self.edit = edit
        self.stop = stop
        self.retain_grad = retain_grad
        self.outputs: dict[int, torch.Tensor] = {}
        self._hooks = HookSet()
        self._reached = False  # the last traced layer ran since `run` began

    def __enter__(self) -> LayerTrace:
        if not self._hooks.attached:
            for index, module in zip(self.layers, self._modules, strict=True):
                self._hooks.forward_hook(module, self._hook(index))
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove()

    def _hook(self, index: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            return self._on_layer(index, output)

        return hook

    def _on_layer(self, index: int, output: Any) -> Any:
        h = layer_output_tensor(output)  # [batch, seq, hidden]
        new = h
        if self.edit is not None:
            new = self.edit(index, h)
            if not isinstance(new, torch.Tensor) or new.shape != h.shape:
                raise ValueError(
                    f"LayerTrace edit of layer {index}: a tensor of shape {tuple(h.shape)} is "
                    f"needed, got {getattr(new, 'shape', type(new).__name__)}"
                )
        if self.retain_grad:
            if not torch.is_grad_enabled():
                raise RuntimeError(f"LayerTrace retain_grad on layer {index} needs grad mode on")
            if not new.requires_grad:
                new = new.detach().requires_grad_()  # a leaf: the gradient w.r.t. this output
            new.retain_grad()
            self.outputs[index] = new
        elif self.retain:
            self.outputs[index] = new.detach()
        if index == self.layers[-1]:
            self._reached = True
            if self.stop:
                raise _StopForward
        return None if new is h else replace_layer_output(output, new)

    def run(self, forward: Callable[[], Any]) -> dict[int, torch.Tensor]:
        """Call `forward()` (a model forward) inside the trace; returns `outputs`.

        With `stop` the forward ends after the last traced layer; otherwise it runs to the end
        (call the model directly inside the `with` block to keep its result).

        Raises:
            RuntimeError: the forward finished without running the last traced layer.
        """
        if not self._hooks.attached:
            raise RuntimeError("LayerTrace.run outside its `with` block")
        self.outputs.clear()
        self._reached = False
        try:
            forward()
        except _StopForward:
            return self.outputs
        if self.stop or not self._reached:
            raise RuntimeError(
                f"the forward finished without running decoder layer {self.layers[-1]}"
            )
        return self.outputs


class LinearTrace:
    """The inputs and output gradients of some linear maps during a forward and backward: what
    a gradient-based editor (MEND, KE) reads, since the fine-tuning gradient of a linear map's
    weight is `sum_p delta_p x_p^T` over positions p (its rank-1 decomposition).

    On enter each module gets a forward hook (in a `HookSet`) that keeps its input x [batch, seq,
    d_in] (detached) and adds a zero "probe" [batch, seq, d_out] to its output, a leaf that
    requires grad: the output's value is unchanged, and `torch.autograd.grad(loss,
    trace.probes())` gives delta, the gradient of the loss with respect to the output, without
    any model parameter requiring grad and without cutting the graph through the layers between
    two traced maps. Each forward overwrites the previous one's values.

    Args:
        modules: {name: nn.Linear} (any module called once per forward with one tensor input).

    Example:
        >>> with LinearTrace({"l5.down": backbone.mlp_out(model, 5)}) as trace:
        ...     loss = nll(model(**inputs).logits)
        ...     grads = trace.gradients(loss)            # {name: delta [b, s, d_out]}
        >>> trace.inputs["l5.down"]                      # x [b, s, d_in]
    """

    def __init__(self, modules: dict[str, nn.Module]):
        if not modules:
            raise ValueError("LinearTrace: no modules given")
        self.modules = dict(modules)
        self.inputs: dict[str, torch.Tensor] = {}
        self._probes: dict[str, torch.Tensor] = {}
        self._hooks = HookSet()

    def __enter__(self) -> LinearTrace:
        if not self._hooks.attached:
            for name, module in self.modules.items():
                self._hooks.forward_hook(module, self._hook(name))
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove()

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled():
                raise RuntimeError(f"LinearTrace on {name!r} needs grad mode on")
            self.inputs[name] = args[0].detach()  # [batch, seq, d_in]
            probe = torch.zeros_like(output, requires_grad=True)  # [batch, seq, d_out]
            self._probes[name] = probe
            return output + probe

        return hook

    def probes(self) -> list[torch.Tensor]:
        """The probes of the last forward, in `modules` order."""
        missing = [name for name in self.modules if name not in self._probes]
        if missing:
            raise RuntimeError(f"LinearTrace: the forward did not run {missing}")
        return [self._probes[name] for name in self.modules]

    def gradients(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: d loss / d output} [batch, seq, d_out] of the last forward (no other
        gradient is accumulated anywhere)."""
        grads = torch.autograd.grad(loss, self.probes(), allow_unused=True)
        return {
            name: grad if grad is not None else torch.zeros_like(self._probes[name])
            for name, grad in zip(self.modules, grads, strict=True)
        }
