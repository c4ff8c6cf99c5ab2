"""`HookSet`: forward hooks owned by one object, and the per-call state of a hook-based method.

A method that acts through hooks (DualEdit, VisEdit, Transformer-Patcher, SERAC's scope hooks...)
registers them through a `HookSet`, which keeps exactly the handles it registered and removes
exactly those (never a module's other hooks). What one forward or generate() call needs (image
positions, prompt ends, decisions) lives in a context object of the method's own type, held by
the hook set and never on modules or in module globals:

- an explicit context, opened by `with hooks.call(ctx):` (a harness, a trainer, the method's own
  `generate`) and dropped in `finally`, covers every pass inside it; calls do not nest;
- automatic contexts for plain `model(**inputs)` / `model.generate(**inputs)` calls
  (`automatic_contexts`): each pass of the decoder stack outside an explicit call hands the
  method a `calls.StackCall` (the pass's ids and attention mask, or `continuation` for a KV-cache
  decode step), the method opens a context from it (or None: leave this pass alone), and a
  forward hook on the decoder stack that runs even when the pass raises drops it.

`current()` is the context a layer hook acts on: the explicit one, else the automatic one.

Example:
    >>> hooks = HookSet()
    >>> hooks.forward_hook(backbone.layer(model, 3), my_layer_hook)
    >>> hooks.automatic_contexts(model, backbone, lambda seen: MyContext(seen.input_ids))
    >>> with hooks.call(MyContext(ids)):
    ...     model(**inputs)  # my_layer_hook reads hooks.current()
    >>> hooks.remove()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dualedit.backbones import Backbone
from dualedit.editors.calls import (
    StackCall,
    decoder_stack,
    embedding_ids,
    pad_token_id,
    stack_call,
)

#: Opens a method's automatic context from one decoder-stack pass (None: leave the pass alone).
OpenAutomatic = Callable[[StackCall], Any]


class HookSet:
    """Forward hooks owned by one object, with an explicit and an automatic per-call context.

    The hook set registers hooks for its owner and keeps their handles; `remove()` (or leaving
    the `with` block) removes exactly those. Contexts are whatever object the owner uses; the
    hook set only holds them for the duration of a call or a decoder-stack pass.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._explicit: Any = None  # from call(...)
        self._automatic: Any = None  # while the decoder stack runs a plain pass
        self._pending_ids: torch.Tensor | None = None  # last ids the input embedding saw
        self._open_automatic: OpenAutomatic | None = None
        self._wanted: Callable[[], bool] | None = None
        self._pad_token_id: int | None = None

    # -- handles ------------------------------------------------------------------------------

    def forward_hook(self, module: nn.Module, fn: Callable[..., Any], **kwargs: Any) -> None:
        """`module.register_forward_hook(fn, **kwargs)`, the handle kept by the hook set."""
        self._handles.append(module.register_forward_hook(fn, **kwargs))

    def forward_pre_hook(self, module: nn.Module, fn: Callable[..., Any], **kwargs: Any) -> None:
        """`module.register_forward_pre_hook(fn, **kwargs)`, the handle kept by the hook set."""
        self._handles.append(module.register_forward_pre_hook(fn, **kwargs))

    @property
    def attached(self) -> bool:
        """Some hook of this set is registered."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove exactly the hooks this set registered (newest first) and drop the automatic
        context; an open explicit call stays open until its `with` block ends."""
        while self._handles:
            self._handles.pop().remove()
        self._automatic = None
        self._pending_ids = None
        self._open_automatic = None
        self._wanted = None

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- per-call contexts --------------------------------------------------------------------

    @contextlib.contextmanager
    def call(self, ctx: Any) -> Iterator[Any]:
        """Hold `ctx` as the explicit context of every pass inside the block.

        Raises:
            RuntimeError: an explicit context is already open (calls do not nest).
            TypeError: `ctx` is None.
        """
        if ctx is None:
            raise TypeError("HookSet.call: a context object is needed, got None")
        if self._explicit is not None:
            raise RuntimeError("a call context is already open (calls do not nest)")
        self._explicit = ctx
        self._pending_ids = None
        try:
            yield ctx
        finally:
            self._explicit = None

    @property
    def explicit(self) -> Any:
        """The context of the open `call(...)`, or None."""
        return self._explicit

    @property
    def automatic(self) -> Any:
        """The automatic context of the decoder-stack pass now running, or None."""
        return self._automatic

    def current(self) -> Any:
        """The context a hook acts on: the explicit one, else the automatic one, else None."""
        return self._explicit if self._explicit is not None else self._automatic

    @property
    def idle(self) -> bool:
        """No call is open and nothing of a plain pass is left (no context, no pending ids)."""
        return self._explicit is None and self._automatic is None and self._pending_ids is None

    # -- automatic contexts (plain model calls) -------------------------------------------------

    def automatic_contexts(
        self,
        model: nn.Module,
        backbone: Backbone,
        open_automatic: OpenAutomatic,
        *,
        wanted: Callable[[], bool] | None = None,
    ) -> None:
        """Open an automatic context for each decoder-stack pass outside an explicit call.

        Registers three hooks (see calls.py): a pre-hook on the language model's input
        embedding that remembers the token ids, a pre-hook on the decoder stack that calls
        `open_automatic(stack_call)` and holds what it returns while the stack runs, and a
        forward hook on the stack (`always_call=True`, so also when the pass raises) that drops
        it. Register the layer hooks that read `current()` before or after: the stack's
        pre-hook runs before any decoder layer either way.

        Args:
            model, backbone: the VLM and its backbone (where the decoder layers are).
            open_automatic: the method's context for one pass, or None to leave it alone.
            wanted: checked at each pass; False skips it (no ids kept, no `StackCall` built),
                e.g. while the method has nothing to do. None: always.

        Raises:
            RuntimeError: automatic contexts are already registered on this set.
        """
        if self._open_automatic is not None:
            raise RuntimeError("automatic contexts are already registered on this hook set")
        self._open_automatic = open_automatic
        self._wanted = wanted
        self._pad_token_id = pad_token_id(model)
        stack = decoder_stack(model, backbone)
        self.forward_pre_hook(model.get_input_embeddings(), self._on_embedding, with_kwargs=True)
        self.forward_pre_hook(stack, self._on_stack_start, with_kwargs=True)
        self.forward_hook(stack, self._on_stack_end, always_call=True)

    def _wants_automatic(self) -> bool:
        return self._explicit is None and (self._wanted is None or self._wanted())

    def _on_embedding(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self._pending_ids = embedding_ids(args, kwargs) if self._wants_automatic() else None

    def _on_stack_start(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        pending, self._pending_ids = self._pending_ids, None
        self._automatic = None
        if self._open_automatic is None or not self._wants_automatic():
            return
        self._automatic = self._open_automatic(stack_call(kwargs, pending, self._pad_token_id))

    def _on_stack_end(self, module: nn.Module, args: Any, output: Any) -> None:
        self._automatic = None
        self._pending_ids = None
