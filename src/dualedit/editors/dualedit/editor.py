"""`DualEditor`: DualEdit on a frozen VLM, for the evaluation harness and for users.

The base model is never copied and never written to: two adapters (text layer t, visual layer v)
act through forward hooks, and each edit is a stored set of hidden states (the frozen model's
layer-t and layer-v outputs on the edit sample), so applying an edit is one forward pass that
stops after layer max(t, v), with no gradient step.

Example:
    >>> editor = DualEditor.from_pretrained(model, processor, "adapters/llava")
    >>> eid = editor.edit(image, "What colour is the ball? The answer is:", "blue")
    >>> out = model.generate(**processor(images=image, text=text, return_tensors="pt"))
    >>> with editor.disabled():
    ...     base = model.generate(**inputs)
    >>> editor.remove(eid)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from dualedit.backbones import Backbone, get_backbone
from dualedit.data.prompts import Sample, encode, group_by_image, record_samples, target_text
from dualedit.data.records import EditRecord
from dualedit.editors.base import Editor, ImageLoader
from dualedit.editors.dualedit.adapter import CrossAttentionAdapter
from dualedit.editors.dualedit.capture import LayerCapture
from dualedit.editors.dualedit.config import ARCHITECTURE_FIELDS, DualEditConfig
from dualedit.editors.dualedit.decision import GateDecision
from dualedit.editors.dualedit.decision import explain as explain_decision
from dualedit.editors.dualedit.files import (
    WEIGHTS_FILE,
    load_adapter_weights,
    read_adapter_config,
    save_adapters,
)
from dualedit.editors.dualedit.hooks import CallContext, DualEditHooks
from dualedit.editors.dualedit.keys import key_parts, text_key_positions
from dualedit.editors.dualedit.memory import EditId, EditInfo, EditMemory, EditStates, pad_states

logger = logging.getLogger(__name__)

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(DualEditConfig))
# Adapters are initialised from this seed (the global RNG is left alone), so two editors built
# the same way start from the same weights.
INIT_SEED = 0

ImageInput = Image.Image | str | os.PathLike | None


class DualEditor(Editor):
    """Text and visual cross-attention adapters with a similarity gate and a memory of edits.

    Options (all None = derived: from `pretrained` when given, else `DualEditConfig` defaults):
    the `DualEditConfig` fields, plus `pretrained` (a `save_pretrained` folder whose adapter
    weights and config to load), `memory_device` (where edit states are kept, e.g. "cpu" for
    many edits on a small GPU; None: beside the layers) and `batch_size` (edit samples per
    forward when adding edits).

    The editor attaches on construction; `detach()` removes its hooks and gives the base model's
    `requires_grad` flags back. Plain `model(**inputs)` / `model.generate(**inputs)` calls are
    edited (each pass derives its image positions and prompt end from its inputs; see hooks.py).
    Callers that know more (teacher forcing: where the prompt ends; training: the edit per input)
    open the context themselves with `context(batch)` / `session(...)`, or go through
    `forward_logits` / `generate` (which keep the prompt pass's decision even without a KV
    cache). `explain(image, prompt)` tells what the gate decides for a question.
    """

    name = "dualedit"
    batched = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        """DualEditConfig fields (None: derived) and loading options; see the class docstring."""

        text_layer: int | None = None
        visual_layer: int | None = None
        width: int | None = None
        heads: int | None = None
        tau: float | None = None
        gate: bool | None = None
        gate_scope: str | None = None
        gate_key: str | None = None
        text_prompt_end: bool | None = None
        text_keys: str | None = None
        use_text: bool | None = None
        use_visual: bool | None = None
        dtype: str | None = None
        pretrained: str | None = None
        memory_device: str | None = None
        batch_size: int = 8

        def __post_init__(self) -> None:
            DualEditConfig(**self.config_fields())  # validates the given fields
            if self.pretrained is not None and not isinstance(self.pretrained, (str, os.PathLike)):
                raise ValueError(f"dualedit option pretrained: a path, got {self.pretrained!r}")
            size = self.batch_size
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"dualedit option batch_size: a positive int, got {size!r}")

        def config_fields(self) -> dict[str, Any]:
            """The DualEditConfig fields that were given (not None)."""
            return {k: getattr(self, k) for k in _CONFIG_FIELDS if getattr(self, k) is not None}

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        backbone: Backbone | None = None,
        *,
        config: DualEditConfig | None = None,
        **options: Any,
    ):
        if config is not None:
            clash = sorted(set(options) & set(_CONFIG_FIELDS))
            if clash:
                raise TypeError(f"dualedit: give {clash} in `config` or as options, not both")
            options = {**config.to_dict(), **options}
        super().__init__(model, processor, backbone or get_backbone(model), **options)
        depth = self.backbone.depth(model)
        hidden = self.backbone.hidden_size(model)
        model_type = model.config.model_type
        saved = None
        if self.options.pretrained is not None:
            saved = read_adapter_config(self.options.pretrained, model_type, hidden)
        self.config = _merge_config(saved, self.options.config_fields()).resolve(
            depth, hidden, model_type, _layer_dtype(self.backbone.layer(model, 0))
        )
        self.text_adapter = self._new_adapter(self.config.text_layer, hidden)
        self.visual_adapter = self._new_adapter(self.config.visual_layer, hidden)
        self.adapters = nn.ModuleDict({"text": self.text_adapter, "visual": self.visual_adapter})
        if saved is not None:
            self.load_adapter_weights(Path(self.options.pretrained) / WEIGHTS_FILE)
        self.memory = EditMemory(
            hidden,
            text_layer=self.config.text_layer,
            visual_layer=self.config.visual_layer,
            model_type=model_type,
            text_keys=self.config.text_keys,
            device=self.options.memory_device,
        )
        self.hooks = DualEditHooks(
            model, self.backbone, self.config, self.text_adapter, self.visual_adapter, self.memory
        )
        self._grad_flags: list[tuple[nn.Parameter, bool]] | None = None
        self.attach()

    def __repr__(self) -> str:
        c = self.config
        return (
            f"DualEditor({self.model.config.model_type}, layers=({c.text_layer}, "
            f"{c.visual_layer}), tau={c.tau}, {len(self.memory)} edits, attached={self.attached})"
        )

    def option_dict(self) -> dict[str, Any]:
        """The resolved config and the loading options, for results.json."""
        return {
            **self.config.to_dict(),
            "pretrained": None if self.options.pretrained is None else str(self.options.pretrained),
            "memory_device": self.options.memory_device,
            "batch_size": self.options.batch_size,
        }

    def _new_adapter(self, layer: int, hidden: int) -> CrossAttentionAdapter:
        device = _layer_device(self.backbone.layer(self.model, layer))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            adapter = CrossAttentionAdapter(
                hidden, self.config.width, self.config.heads, dtype=self.config.torch_dtype
            )
        return adapter.to(device)

    # -- attaching ----------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self.hooks.attached

    def attach(self) -> None:
        """Hook the adapters into the model and freeze the base model (a no-op when attached)."""
        if self.attached:
            return
        self._grad_flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._grad_flags:
            p.requires_grad_(False)
        self.hooks.attach()

    def detach(self) -> None:
        """Remove the hooks and give back the base model's `requires_grad` flags."""
        self.hooks.detach()
        if self._grad_flags is not None:
            for p, flag in self._grad_flags:
                p.requires_grad_(flag)
            self._grad_flags = None

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """`with editor.disabled(): ...` runs the unedited model (hooks stay attached)."""
        return self.hooks.disabled()

    def parameters(self) -> Iterator[nn.Parameter]:
        """The adapters' parameters (the only trainable ones)."""
        return self.adapters.parameters()

    # -- per-call context (harness) -----------------------------------------------------------

    def context(self, batch: Any) -> contextlib.AbstractContextManager[CallContext]:
        """The per-call context for an `EncodedBatch` (teacher forcing) or `PromptBatch`."""
        return self.hooks.call(batch.image_mask, batch.attention_mask, batch.prompt_end)

    def session(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_end: torch.Tensor | None = None,
        *,
        edits: EditStates | None = None,
        gate: bool | None = None,
    ) -> contextlib.AbstractContextManager[CallContext]:
        """A per-call context from raw model inputs.

        Args:
            input_ids, attention_mask: [batch, seq] as given to the model.
            prompt_end: [batch] index of each input's last prompt token; None = the last non-pad
                token (inputs that are prompts only, as for generate()).
            edits: one edit per input (training, see `encode_edits`); None looks up the memory.
            gate: override the config's gate for this call.
        """
        image_mask = self.backbone.image_mask(self.model, input_ids) & attention_mask.bool()
        if prompt_end is None:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            prompt_end = torch.where(attention_mask.bool(), pos, -1).max(dim=1).values
        return self.hooks.call(image_mask, attention_mask, prompt_end, edits=edits, gate=gate)

    def forward_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        prompt_end: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Edited logits [batch, seq, vocab]; see `session` for `prompt_end`."""
        with self.session(input_ids, attention_mask, prompt_end):
            return self.backbone.forward_logits(self.model, input_ids, attention_mask, pixel_values)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Edited generation from left-padded prompts: new tokens [batch, new]."""
        with self.session(input_ids, attention_mask):
            return self.backbone.generate(
                self.model, input_ids, attention_mask, pixel_values, **generate_kwargs
            )

    def explain(self, image: ImageInput, prompt: str) -> GateDecision:
        """What the hooks decide for a question: the nearest stored edit, its gate similarity,
        and whether the question is edited (one forward that stops at the text layer).

        Args:
            image: a PIL image, a path to one, or None for a text-only question.
            prompt: the question as the model sees it (as for `edit`).

        Example:
            >>> editor.explain(image, "What colour is the ball? The answer is:")
            GateDecision(edit_id=0, similarity=0.97, gate_open=True, edited=True)
        """
        opened = None if image is None else _open_image(image, 0)
        return explain_decision(self, opened, prompt)

    # -- edits --------------------------------------------------------------------------------

    def apply(self, records: Sequence[EditRecord], task: str, images: ImageLoader) -> None:
        """Add the edits of `records` (image, src -> alt, the Rel sample) to the memory."""
        samples = [record_samples(record, task)["rel"] for record in records]
        states = self._capture(samples, images)
        for sample, (text, visual, keys) in zip(samples, states, strict=True):
            self.memory.add(
                text, visual, keys, prompt=sample.prompt, target=sample.target, image=sample.image
            )
        logger.debug("dualedit: applied records %s", [r.index for r in records])

    def restore(self) -> None:
        """Forget every edit (the base weights were never touched)."""
        self.memory.clear()

    def edit(
        self, image: ImageInput, prompt: str, target: str, *, edit_id: EditId | None = None
    ) -> EditId:
        """Store the edit (image, prompt -> target) and return its id.

        Args:
            image: a PIL image, a path to one, or None for a text-only edit.
            prompt: the question as the model sees it (e.g. "What is it? The answer is:").
            target: the new answer (a leading space is added: the model reads prompt + " " +
                target).
            edit_id: a short string id, or None for the next int id.

        Example:
            >>> eid = editor.edit(Image.open("ball.png"), "What colour is the ball?", "blue")
        """
        ids = None if edit_id is None else [edit_id]
        return self.edit_many([image], [prompt], [target], edit_ids=ids)[0]

    def edit_many(
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[str],
        targets: Sequence[str],
        *,
        edit_ids: Sequence[EditId] | None = None,
    ) -> list[EditId]:
        """Store several edits (batched forwards); returns their ids in order."""
        samples, loader = self._user_samples(images, prompts, targets)
        if edit_ids is not None and len(edit_ids) != len(samples):
            raise ValueError(f"edit_many: {len(edit_ids)} ids for {len(samples)} edits")
        states = self._capture(samples, loader)
        added = []
        for i, (text, visual, keys) in enumerate(states):
            added.append(
                self.memory.add(
                    text,
                    visual,
                    keys,
                    edit_id=None if edit_ids is None else edit_ids[i],
                    prompt=prompts[i],
                    target=targets[i],
                    image=_describe(images[i]),
                )
            )
        return added

    def encode_edits(
        self, images: Sequence[ImageInput], prompts: Sequence[str], targets: Sequence[str]
    ) -> EditStates:
        """Edit states for a batch without storing them: one per input, for `session(edits=...)`
        (a trainer's forward with the gate off). No gradient reaches the base model."""
        samples, loader = self._user_samples(images, prompts, targets)
        states = self._capture(samples, loader)
        return states_of(states, device=self._input_device)

    def remove(self, edit_id: EditId) -> None:
        """Forget one edit (KeyError for an unknown id)."""
        self.memory.remove(edit_id)

    def edits(self) -> list[EditInfo]:
        """The stored edits, oldest first."""
        return self.memory.entries()

    @property
    def _input_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _user_samples(
        self, images: Sequence[ImageInput], prompts: Sequence[str], targets: Sequence[str]
    ) -> tuple[list[Sample], ImageLoader]:
        if not len(images) == len(prompts) == len(targets):
            raise ValueError(
                f"{len(images)} images, {len(prompts)} prompts and {len(targets)} targets"
            )
        loaded: dict[str, Image.Image] = {}
        samples = []
        for i, (image, prompt, target) in enumerate(zip(images, prompts, targets, strict=True)):
            if not isinstance(prompt, str) or not isinstance(target, str) or not target.strip():
                raise ValueError(f"edit {i}: prompt and a non-empty target must be strings")
            key = None
            if image is not None:
                key = f"edit-{i}"
                loaded[key] = _open_image(image, i)
            samples.append(Sample(key, prompt, target_text(target.lstrip())))
        return samples, loaded.__getitem__

    def _capture(
        self, samples: Sequence[Sample], load_image: ImageLoader
    ) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """(text states, visual states, gate keys) of each sample, from a frozen forward that
        stops after layer max(t, v), adapters off, no gradient."""
        t, v = self.config.text_layer, self.config.visual_layer
        out: list[Any] = [None] * len(samples)
        size = self.options.batch_size
        # model.eval() walks every submodule (~4 ms on the small VLMs, a sixth of a forward):
        # only a model in training mode is switched, and switched back after.
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            for rows in group_by_image(samples).values():
                for start in range(0, len(rows), size):
                    chunk = rows[start : start + size]
                    batch = encode(
                        [samples[i] for i in chunk], self.processor, self.backbone, load_image
                    ).to(self._input_device)
                    forward = functools.partial(
                        self.backbone.forward_logits,
                        self.model,
                        batch.input_ids,
                        batch.attention_mask,
                        batch.pixel_values,
                    )
                    with (
                        torch.no_grad(),
                        self.hooks.disabled(),
                        LayerCapture(self.model, self.backbone, [t, v]) as capture,
                    ):
                        outputs = capture.run(forward)
                    for row, i in enumerate(chunk):
                        out[i] = _edit_states(outputs, t, v, batch, row, self.config.text_keys)
        finally:
            if was_training:
                self.model.train()
        return out

    # -- files --------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `adapter_config.json` and `adapter_model.safetensors` (not the edit memory:
        see `save_memory`). Returns the directory."""
        config = self.model.config
        return save_adapters(
            directory,
            self.adapters,
            self.config,
            base_model=str(getattr(config, "name_or_path", "") or ""),
            model_type=config.model_type,
            hidden_size=self.backbone.hidden_size(self.model),
            depth=self.backbone.depth(self.model),
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        processor: Any,
        directory: str | os.PathLike,
        backbone: Backbone | None = None,
        **overrides: Any,
    ) -> DualEditor:
        """An editor with the adapters saved in `directory`; run-time fields (tau, gate, gate_scope,
        gate_key, use_text, use_visual, dtype) may be overridden, the architecture may not.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: another architecture or hidden size than the saved adapters', a changed
                architecture field, or weights that do not match (missing / unexpected keys).
        """
        return cls(model, processor, backbone, pretrained=str(directory), **overrides)

    def load_adapter_weights(self, path: str | os.PathLike) -> None:
        """Load adapter weights strictly (names missing and unexpected keys, wrong shapes)."""
        load_adapter_weights(self.adapters, path)

    def save_memory(self, directory: str | os.PathLike) -> Path:
        """Write the edit memory (see `EditMemory.save`)."""
        return self.memory.save(directory)

    def load_memory(self, directory: str | os.PathLike) -> None:
        """Replace the stored edits by those saved in `directory` (checked against the model's
        hidden size, the adapter layers and the model type)."""
        self.memory.read(directory)


def states_of(
    states: Sequence[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]],
    device: torch.device | str | None = None,
) -> EditStates:
    """Pad per-edit (text, visual, keys) triples into one `EditStates`, one edit per row."""
    text, text_mask = pad_states([s[0] for s in states], device)
    visual, visual_mask = pad_states([s[1] for s in states], device)
    keys = {k: torch.stack([s[2][k] for s in states]).to(text.device) for k in states[0][2]}
    return EditStates(text, text_mask, visual, visual_mask, keys)


def _merge_config(saved: DualEditConfig | None, given: dict[str, Any]) -> DualEditConfig:
    if saved is None:
        return DualEditConfig(**given)
    changed = [k for k in ARCHITECTURE_FIELDS if k in given and given[k] != getattr(saved, k)]
    if changed:
        raise ValueError(
            f"dualedit: {changed} differ from the saved adapters' "
            f"{ {k: getattr(saved, k) for k in changed} }; the weights fix them"
        )
    return dataclasses.replace(saved, **given)


def _edit_states(
    outputs: dict[int, torch.Tensor], t: int, v: int, batch: Any, row: int, text_keys: str
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One edit's trimmed states and gate key parts from a right-padded captured batch."""
    n = int(batch.attention_mask[row].sum())
    full = outputs[t][row, :n]  # [n, hidden]
    image_mask = batch.image_mask[row : row + 1, :n].to(full.device)  # [1, n]
    end = batch.prompt_end[row : row + 1]
    keep = text_key_positions(batch.attention_mask[row : row + 1, :n], image_mask, end, text_keys)
    text = full[keep[0].to(full.device)].clone()  # [n_text, hidden]
    if v != t:
        visual = outputs[v][row, :n].clone()  # [n, hidden]
    else:
        visual = text if text.shape[0] == n else full.clone()
    last = torch.tensor([n - 1], device=full.device)
    keys = {
        k: key[0].clone()
        for k, key in key_parts(full[None], end, last, image_mask.bool()).items()
    }
    return text, visual, keys


def _open_image(image: Any, i: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"edit {i}: image {path} not found")
        with Image.open(path) as opened:
            return opened.convert("RGB")
    raise TypeError(f"edit {i}: image must be a PIL image, a path or None, got {type(image)}")


def _describe(image: ImageInput) -> str | None:
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return f"<PIL image {image.size[0]}x{image.size[1]}>"
    return str(image)


def _layer_device(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device


def _layer_dtype(layer: nn.Module) -> torch.dtype:
    return next(layer.parameters()).dtype
