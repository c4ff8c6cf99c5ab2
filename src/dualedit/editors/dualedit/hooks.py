"""Forward hooks that run the DualEdit adapters on two decoder layers.

`DualEditHooks` registers its hooks (on the text layer t, the visual layer v, and through
`editors.hooks.HookSet.automatic_contexts` on the language model's input embedding and the
decoder stack) in a `HookSet`, which removes exactly those. What one forward or generate() call
needs (image positions, each input's prompt end, the gate decision, the chosen edit) lives in a
`CallContext` held by the hook set, never on modules or in module globals:

- an explicit context, opened by `call(...)` (the harness, training, `DualEditor.generate`) and
  dropped in `finally`, covers every pass inside it (prompt pass and decode steps);
- otherwise, when edits are stored, each pass of the decoder stack opens an automatic context from
  its own inputs (`editors.calls.StackCall`: image positions from the placeholder ids, padding
  from the attention mask; prompt end = last attended token) and a forward hook that runs even
  when the pass raises drops it. So plain `model(**inputs)` and `model.generate(**inputs)` work
  on both backbones. A decode step (the KV cache already holds tokens) is never edited; without a
  cache (`use_cache=False`) every step is a fresh pass whose prompt includes the tokens generated
  so far (`DualEditor.generate` keeps the first pass's decision instead).

Per input, on the first pass of a call (the prompt pass in generate()):
- the gate key is read from the text layer's output (keys.py): at the input's last prompt token
  ("prompt_end"), at its last non-pad position ("last_position"), or the last prompt token
  combined with the mean over the image positions ("prompt_end_image": mean of the two cosines;
  "prompt_end_and_image": the smaller of the two);
- the nearest stored edit is chosen by cosine similarity (or the edits are given by the caller);
- with the gate on, an input whose similarity is below tau is left unedited.
The decision holds for the rest of the call. Text adapter positions: after the image (or from
the first token when there is none) up to the last prompt token, which is included only with
`config.text_prompt_end` (the released code excludes it); visual adapter
positions: the image positions. Single-position passes after the first (KV-cache decode steps)
are never edited: their effect comes through the edited cache.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dualedit.backbones import Backbone, layer_output_tensor, replace_layer_output
from dualedit.editors.calls import StackCall
from dualedit.editors.dualedit.adapter import CrossAttentionAdapter
from dualedit.editors.dualedit.config import DualEditConfig
from dualedit.editors.dualedit.gate import decide, last_positions
from dualedit.editors.dualedit.memory import EditMemory, EditStates
from dualedit.editors.hooks import HookSet

logger = logging.getLogger(__name__)


@dataclass
class CallContext:
    """Per-call state of one forward or generate() call (see module docstring).

    Attributes:
        image_mask: [batch, seq] bool, image positions of the call's input.
        attention_mask: [batch, seq] bool, False on padding.
        prompt_end: [batch] long, index of each input's last prompt token.
        edits: one edit per input given by the caller (training), or None to look up the memory.
        gate: whether the gate applies in this call.
        decided: the gate decision has been taken (on the first pass).
        active: some input is edited in this call.
        open: [batch] bool, the gate decision per input.
        similarity: [batch] float32, cosine similarity to the chosen edit (NaN without edits).
        chosen: [batch] long, memory position of each input's edit (-1: edits given / none).
        states: the chosen edits' states: one per input, or one per distinct edit with
            `edit_index`.
        edit_index: [batch] long, the row of `states` each input uses (None: row i, its own).
        automatic: opened by the hooks from a plain model call (not by `call(...)`).
    """

    image_mask: torch.Tensor
    attention_mask: torch.Tensor
    prompt_end: torch.Tensor
    edits: EditStates | None
    gate: bool
    decided: bool = False
    active: bool = False
    open: torch.Tensor | None = None
    similarity: torch.Tensor | None = None
    chosen: torch.Tensor | None = None
    states: EditStates | None = None
    edit_index: torch.Tensor | None = None
    automatic: bool = False


def text_positions(
    image_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_end: torch.Tensor,
    *,
    include_prompt_end: bool = False,
) -> torch.Tensor:
    """Where the text adapter acts: after the last image position (or from the first non-pad
    token when there is no image) up to the last prompt token, no padding. The last prompt token
    itself only with `include_prompt_end` (the released code stops just before it).

    image_mask, attention_mask [batch, seq], prompt_end [batch] -> [batch, seq] bool.
    """
    seq = image_mask.shape[1]
    pos = torch.arange(seq, device=image_mask.device)  # [seq]
    attended = attention_mask.bool()
    first = attended.int().argmax(dim=1)  # [batch], first non-pad position
    last_image = torch.where(image_mask, pos, -1).max(dim=1).values  # [batch], -1 without image
    start = torch.where(image_mask.any(dim=1), last_image + 1, first)  # [batch]
    end = prompt_end.to(pos.device) + int(include_prompt_end)  # [batch], exclusive
    window = (pos >= start[:, None]) & (pos < end[:, None])  # [batch, seq]
    return window & attended & ~image_mask


def apply_adapter(
    adapter: CrossAttentionAdapter,
    h: torch.Tensor,
    mask: torch.Tensor,
    h_edit: torch.Tensor,
    edit_mask: torch.Tensor,
    edit_index: torch.Tensor | None = None,
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """`h` with the adapter applied at the positions of `mask` only (a new tensor).

    Only the selected positions are gathered (padded per input to the largest count), so a text
    adapter on a few prompt tokens does not pay for the image positions; only the edits of the
    rows with something to edit are projected, each once however many rows share it.

    Args:
        h: [batch, seq, hidden] layer output.
        mask: [batch, seq] bool, positions to edit.
        h_edit: [u, m, hidden] edit states; edit_mask [u, m] bool.
        edit_index: [batch] long, the row of `h_edit` each input uses; None: row i uses row i.
        anchor: [u, hidden] one state per edit, for adapters whose `delta` takes one (VisEdit's
            influence map reads the edit's last prompt token); None: not passed.

    Returns:
        [batch, seq, hidden], equal to `h` bit for bit outside `mask`.
    """
    rows = mask.any(dim=1).nonzero().squeeze(1)  # [r] inputs with something to edit
    if rows.numel() == 0:
        return h
    sub_mask = mask.index_select(0, rows)  # [r, seq]
    counts = sub_mask.sum(dim=1)  # [r]
    n = int(counts.max())
    # Selected positions first (stable, so in order), then the rest; keep the first n.
    order = torch.argsort((~sub_mask).to(torch.int8), dim=1, stable=True)[:, :n]  # [r, n]
    valid = torch.arange(n, device=h.device)[None, :] < counts[:, None]  # [r, n]
    hidden = h.shape[-1]
    queries = h.index_select(0, rows).gather(
        1, order[:, :, None].expand(-1, -1, hidden)
    )  # [r, n, hidden]
    if edit_index is not None:
        edit_rows = edit_index.index_select(0, rows)  # [r]
    elif rows.numel() == h_edit.shape[0]:
        edit_rows = None  # every row is edited, each with its own edit
    else:
        edit_rows = rows
    if anchor is None:
        delta = adapter.delta(queries, h_edit, edit_mask, edit_rows)  # [r, n, hidden]
    else:
        delta = adapter.delta(queries, h_edit, edit_mask, edit_rows, anchor=anchor)
    row_index = rows[:, None].expand(-1, n)[valid]  # [k]
    pos_index = order[valid]  # [k]
    # h + delta at the selected positions (each at most once), h itself everywhere else.
    return h.index_put((row_index, pos_index), delta[valid], accumulate=True)  # [b, seq, hidden]


class DualEditHooks:
    """The forward hooks of the two adapters: attach, detach, per-call contexts.

    Args:
        model: the VLM (never copied, never modified: the hooks return new tensors).
        backbone: its backbone (where the decoder layers are).
        config: a resolved `DualEditConfig`.
        text_adapter, visual_adapter: the adapters (no text adapter: None, with
            `config.use_text` False).
        memory: the edit memory looked up when a call gives no edits itself.

    Attributes:
        hook_set: the `HookSet` holding its hooks and the explicit / automatic context.

    Example:
        >>> with hooks:  # attach ... detach
        ...     with hooks.call(image_mask, attention_mask, prompt_end):
        ...         logits = model(**inputs).logits
    """

    def __init__(
        self,
        model: nn.Module,
        backbone: Backbone,
        config: DualEditConfig,
        text_adapter: CrossAttentionAdapter | None,
        visual_adapter: CrossAttentionAdapter,
        memory: EditMemory,
    ):
        if not config.resolved:
            raise ValueError("DualEditHooks needs a resolved DualEditConfig (config.resolve)")
        if config.use_text and text_adapter is None:
            raise ValueError("DualEditHooks: use_text is on but there is no text adapter")
        self.model = model
        self.backbone = backbone
        self.config = config
        self.text_adapter = text_adapter
        self.visual_adapter = visual_adapter
        self.memory = memory
        self.hook_set = HookSet()
        self._disabled = False

    # -- attaching ----------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        """The hooked decoder layers: the text layer (gate key) always, the visual one when used."""
        used = {self.config.text_layer}
        if self.config.use_visual:
            used.add(self.config.visual_layer)
        return sorted(used)

    @property
    def attached(self) -> bool:
        return self.hook_set.attached

    def attach(self) -> None:
        """Register the forward hooks (a no-op when already attached)."""
        if self.hook_set.attached:
            return
        for index in self.layers:
            self.hook_set.forward_hook(self.backbone.layer(self.model, index), self._hook(index))
        self.hook_set.automatic_contexts(
            self.model, self.backbone, self._open_automatic, wanted=self._wants_auto
        )

    def detach(self) -> None:
        """Remove exactly the hooks this object registered."""
        self.hook_set.remove()

    def __enter__(self) -> DualEditHooks:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the block the hooks leave every layer output as it is."""
        previous = self._disabled
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = previous

    # -- per-call context ---------------------------------------------------------------------

    @contextlib.contextmanager
    def call(
        self,
        image_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_end: torch.Tensor,
        *,
        edits: EditStates | None = None,
        gate: bool | None = None,
    ) -> Iterator[CallContext]:
        """Open the per-call context for one forward or generate() call.

        Args:
            image_mask: [batch, seq] bool image positions of the input.
            attention_mask: [batch, seq], 0 on padding.
            prompt_end: [batch] index of each input's last prompt token.
            edits: one edit per input (e.g. from `DualEditor.encode_edits` for training); None
                looks up the nearest stored edit.
            gate: override the config's gate for this call (e.g. False for training).

        Yields:
            The context; after the call it holds the gate decision (`open`, `similarity`,
            `chosen`) for inspection.
        """
        batch = image_mask.shape[0]
        if attention_mask.shape != image_mask.shape or tuple(prompt_end.shape) != (batch,):
            raise ValueError(
                f"call context: image_mask {tuple(image_mask.shape)}, attention_mask "
                f"{tuple(attention_mask.shape)} and prompt_end {tuple(prompt_end.shape)} disagree"
            )
        if edits is not None and len(edits) != batch:
            raise ValueError(f"call context: {len(edits)} edits given for {batch} inputs")
        ctx = CallContext(
            image_mask=image_mask.bool(),
            attention_mask=attention_mask.bool(),
            prompt_end=prompt_end.long(),
            edits=edits,
            gate=self.config.gate if gate is None else bool(gate),
        )
        with self.hook_set.call(ctx):  # RuntimeError when a call is already open
            yield ctx

    # -- automatic contexts (plain model calls) -------------------------------------------------

    def _wants_auto(self) -> bool:
        return not self._disabled and len(self.memory) > 0

    def _open_automatic(self, seen: StackCall) -> CallContext | None:
        """The context of one plain decoder-stack pass (None: no ids of its shape are known,
        the layer hook says so)."""
        if seen.continuation:
            # A decode step: the cache holds the prompt pass's (edited) keys and values.
            return CallContext(
                image_mask=torch.zeros(0, 0, dtype=torch.bool),
                attention_mask=torch.zeros(0, 0, dtype=torch.bool),
                prompt_end=torch.zeros(0, dtype=torch.long),
                edits=None,
                gate=self.config.gate,
                decided=True,
                automatic=True,
            )
        if seen.input_ids is None:
            return None
        mask = seen.attention_mask  # [batch, seq] bool
        return CallContext(
            image_mask=self.backbone.image_mask(self.model, seen.input_ids) & mask,
            attention_mask=mask,
            prompt_end=last_positions(mask),
            edits=None,
            gate=self.config.gate,
            automatic=True,
        )

    # -- the hook -----------------------------------------------------------------------------

    def _hook(self, index: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            return self._on_layer(index, output)

        return hook

    def _on_layer(self, index: int, output: Any) -> Any:
        if self._disabled:
            return None
        ctx = self.hook_set.current()
        if ctx is None:
            if len(self.memory) == 0:
                return None
            raise RuntimeError(
                "DualEdit hooks ran without a call context while edits are stored: the decoder "
                "layers ran outside the model's forward, or the model was given `inputs_embeds` "
                "without token ids; run them inside `editor.context(batch)` / "
                "`editor.session(...)`, or call the model with `input_ids`"
            )
        h = layer_output_tensor(output)  # [batch, seq, hidden]
        seq = h.shape[1]
        if ctx.decided and seq == 1:
            return None  # KV-cache decode step: nothing is edited, the cache carries the edit
        if not ctx.decided:
            if index != self.config.text_layer:
                raise RuntimeError(f"layer {index} ran before the text layer in a DualEdit call")
            self._decide(ctx, h)
        if not ctx.active:
            return None
        # Layers may sit on other devices than the inputs (sharded models): follow h.
        device = h.device
        image_mask = _fit(ctx.image_mask, seq).to(device)  # [batch, seq]
        attention_mask = _fit(ctx.attention_mask, seq).to(device)  # [batch, seq]
        gate_open = ctx.open.to(device)[:, None]  # [batch, 1]
        states = ctx.states
        edit_index = None if ctx.edit_index is None else ctx.edit_index.to(device)  # [batch]
        edited = h
        if index == self.config.text_layer and self.config.use_text:
            mask = text_positions(
                image_mask,
                attention_mask,
                ctx.prompt_end,
                include_prompt_end=self.config.text_prompt_end,
            )
            mask = mask & gate_open
            edited = apply_adapter(
                self.text_adapter,
                edited,
                mask,
                states.text.to(device),
                states.text_mask.to(device),
                edit_index,
            )
        if index == self.config.visual_layer and self.config.use_visual:
            mask = image_mask & attention_mask
            if self.config.gate_scope == "both":
                mask = mask & gate_open
            anchor = None
            if getattr(self.visual_adapter, "uses_anchor", False):
                anchor = states.keys["prompt_end"].to(device)  # [u, hidden]
            edited = apply_adapter(
                self.visual_adapter,
                edited,
                mask,
                states.visual.to(device),
                states.visual_mask.to(device),
                edit_index,
                anchor,
            )
        return None if edited is h else replace_layer_output(output, edited)

    def _decide(self, ctx: CallContext, h: torch.Tensor) -> None:
        """The gate decision of the call (gate.py), from the text layer's output."""
        decide(ctx, h, self.memory, self.config)

def _fit(mask: torch.Tensor, seq: int) -> torch.Tensor:
    """A [batch, seq0] mask for a pass of `seq` positions: later positions (generated tokens
    re-run without a cache) are never edited."""
    width = mask.shape[1]
    if seq == width:
        return mask
    if seq < width:
        raise RuntimeError(f"a pass of {seq} positions inside a call opened for {width}")
    return F.pad(mask, (0, seq - width), value=False)
