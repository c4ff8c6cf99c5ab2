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
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dualedit.backbones import Backbone, get_backbone
from dualedit.data.prompts import Sample, encode_prompts
from dualedit.data.requests import EditRequest
from dualedit.editors.base import (
    EditId,
    Editor,
    ImageInput,
    ImageLoader,
    check_saved_model,
    open_image,
    user_requests,
)
from dualedit.editors.capture import LayerTrace
from dualedit.editors.dualedit.adapter import CrossAttentionAdapter
from dualedit.editors.dualedit.config import DualEditConfig
from dualedit.editors.dualedit.files import (
    WEIGHTS_FILE,
    adapter_config,
    merge_config,
    load_adapter_tensors,
    load_adapter_weights,
)
from dualedit.editors.files import EditorFolder, read_editor_folder
from dualedit.folders import FolderWriter
from dualedit.editors.dualedit.gate import GateDecision, decision_of
from dualedit.editors.dualedit.hooks import CallContext, DualEditHooks
from dualedit.editors.dualedit.memory import INDEX_FILE as MEMORY_INDEX_FILE
from dualedit.editors.dualedit.memory import STATES_FILE as MEMORY_STATES_FILE
from dualedit.editors.dualedit.capture_states import capture_states, states_of
from dualedit.editors.dualedit.heads import FILE as HEADS_FILE
from dualedit.editors.dualedit.heads import heads_from, heads_meta
from dualedit.editors.dualedit.memory import EditInfo, EditMemory, EditStates
from dualedit.editors.weights import GradFlags, freeze

logger = logging.getLogger(__name__)

# Adapters are initialised from this seed (the global RNG is left alone), so two editors built
# the same way start from the same weights.
INIT_SEED = 0


class DualEditor(Editor):
    """Text and visual cross-attention adapters with a similarity gate and a memory of edits.

    Args:
        model, processor, backbone: the VLM, its processor, its backbone (None: looked up).
        config: a `DualEditConfig` (or a dict of its fields); fields left None are derived from
            the model (`DualEditConfig.resolve`).
        pretrained: a `save_pretrained` folder whose adapters (and edits, when it holds any) to
            load; its config is used, with the run-time fields given in `options` replaced (the
            architecture fields fix the weights and may not change). Same as `from_pretrained`.
        memory_device: where edit states are kept (e.g. "cpu" for many edits on a small GPU;
            None: beside the layers).
        batch_size: edit samples per forward when adding edits.
        **options: `DualEditConfig` fields (unknown ones are refused by name).

    The editor attaches on construction; `detach()` removes its hooks and gives the base model's
    `requires_grad` flags back. Plain `model(**inputs)` / `model.generate(**inputs)` calls are
    edited (each pass derives its image positions and prompt end from its inputs; see hooks.py).
    Callers that know more (teacher forcing: where the prompt ends; training: the edit per input)
    open the context themselves with `context(batch)` / `session(...)`, or go through `logits` /
    `generate` (which keep the prompt pass's decision even without a KV cache).
    `explain(image, prompt)` tells what the gate decides for a question.
    """

    name = "dualedit"
    Config = DualEditConfig

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        backbone: Backbone | None = None,
        *,
        config: DualEditConfig | dict[str, Any] | None = None,
        pretrained: str | os.PathLike | None = None,
        memory_device: str | torch.device | None = None,
        batch_size: int = 8,
        ignore_base_mismatch: bool = False,
        **options: Any,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"dualedit option batch_size: a positive int, got {batch_size!r}")
        if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
            raise ValueError(f"dualedit option pretrained: a path, got {pretrained!r}")
        backbone = backbone if backbone is not None else get_backbone(model)
        depth = backbone.depth(model)
        hidden = backbone.hidden_size(model)
        model_type = model.config.model_type
        folder = None
        if pretrained is not None:
            if config is not None:
                raise TypeError("dualedit: give `config` or `pretrained`, not both")
            folder = read_editor_folder(pretrained)
            fingerprint = check_saved_model(
                folder, model, backbone, ignore_base_mismatch=ignore_base_mismatch
            )
            saved = adapter_config(folder, type(self).Config, self.name)
            config, options = merge_config(saved, options, self.name), {}
        super().__init__(model, processor, backbone, config=config, **options)
        self.config: DualEditConfig = self.config.resolve(
            depth, hidden, model_type, _layer_dtype(self.backbone.layer(model, 0))
        )
        self.source = None if pretrained is None else str(pretrained)
        self.memory_device = memory_device
        self.batch_size = batch_size
        layers = {"text": self.config.text_layer, "visual": self.config.visual_layer}
        self.adapters = nn.ModuleDict(
            {kind: self._new_adapter(layers[kind], hidden, kind) for kind in self.adapter_kinds}
        )
        self.text_adapter: CrossAttentionAdapter | None = (
            self.adapters["text"] if "text" in self.adapters else None
        )
        self.visual_adapter: CrossAttentionAdapter = self.adapters["visual"]
        self.memory = EditMemory(
            hidden,
            text_layer=self.config.text_layer,
            visual_layer=self.config.visual_layer,
            model_type=model_type,
            text_keys=self.config.text_keys,
            device=memory_device,
        )
        if folder is not None:
            self.load_state(folder.meta, folder.tensors, str(folder.path / WEIGHTS_FILE))
            self.load_files(folder)
            self._revisions[str(Path(pretrained).absolute().resolve())] = folder.revision or ""
            self._base_fingerprint = fingerprint
        self.hooks = DualEditHooks(
            model, self.backbone, self.config, self.text_adapter, self.visual_adapter, self.memory
        )
        self._grad_flags: GradFlags | None = None
        self.attach()

    def __repr__(self) -> str:
        c = self.config
        return (
            f"DualEditor({self.model.config.model_type}, layers=({c.text_layer}, "
            f"{c.visual_layer}), tau={c.tau}, {len(self.memory)} edits, attached={self.attached})"
        )

    def config_dict(self) -> dict[str, Any]:
        """The resolved config (recorded in results.json and saved beside the weights)."""
        return self.config.to_dict()

    #: The adapters the editor holds (and saves); VisEdit has only the visual one.
    adapter_kinds: tuple[str, ...] = ("text", "visual")

    def _new_adapter(self, layer: int, hidden: int, kind: str) -> CrossAttentionAdapter:
        """The adapter of `kind` ("text" or "visual") on `layer`, from the fixed init seed."""
        device = _layer_device(self.backbone.layer(self.model, layer))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            adapter = self._adapter_module(hidden, kind)
        return adapter.to(device)

    def _adapter_module(self, hidden: int, kind: str) -> CrossAttentionAdapter:
        """A new adapter module (VisEdit's visual adapter adds its influence map)."""
        return CrossAttentionAdapter(
            hidden, self.config.width, self.config.heads, dtype=self.config.torch_dtype
        )

    # -- attaching ----------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self.hooks.attached

    def attach(self) -> None:
        """Hook the adapters into the model and freeze the base model (a no-op when attached)."""
        if self.attached:
            return
        self._grad_flags = freeze(self.model)
        self.hooks.attach()

    def detach(self) -> None:
        """Remove the hooks and give back the base model's `requires_grad` flags."""
        self.hooks.detach()
        if self._grad_flags is not None:
            self._grad_flags.give_back()
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

    def generate_from(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Edited generation from raw left-padded prompt tensors: new tokens [batch, new] (the
        harness's `generate(batch)` takes an encoded `PromptBatch` instead)."""
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
        if not isinstance(prompt, str):
            raise TypeError(f"explain: prompt must be a string, got {type(prompt).__name__}")
        opened = None if image is None else open_image(image, 0)
        sample = Sample(None if opened is None else "query", prompt, "")
        batch = encode_prompts([sample], self.processor, self.backbone, lambda _: opened).to(
            self._input_device
        )
        forward = self._forward_of(batch)
        with (
            torch.no_grad(),
            self.session(batch.input_ids, batch.attention_mask) as ctx,
            LayerTrace(self.model, self.backbone, [self.config.text_layer], stop=True) as trace,
        ):
            trace.run(forward)  # registered after the editor's hooks: the gate decides first
        return self.decision(ctx, 0)

    def decision(self, ctx: CallContext, row: int) -> GateDecision:
        """Row `row`'s gate decision from a call context whose first pass has run."""
        visual_ungated = self.config.use_visual and self.config.gate_scope == "text"
        return decision_of(ctx, row, self.memory.ids, visual_ungated)

    # -- edits --------------------------------------------------------------------------------

    def apply(
        self,
        requests: Sequence[EditRequest],
        images: ImageLoader,
        *,
        ids: Sequence[EditId] | None = None,
    ) -> list[EditId]:
        """Store the edits of `requests` in the memory (one frozen forward per batch of edit
        samples that stops after layer max(t, v)); returns their ids."""
        if ids is not None and len(ids) != len(requests):
            raise ValueError(f"{len(ids)} ids for {len(requests)} edits")
        samples = [request.sample() for request in requests]
        states = self._capture(samples, images)
        texts, visuals, keys = zip(*states, strict=True) if states else ((), (), ())
        added = self.memory.add_many(  # all of them or, if one is refused, none
            texts, visuals, keys, edit_ids=ids,
            prompts=[r.prompt for r in requests], targets=[r.target for r in requests],
            images=[r.image for r in requests],
        )
        logger.debug("dualedit: stored edits %s", added)
        return added

    def restore(self) -> None:
        """Forget every edit (the base weights were never touched)."""
        self.memory.clear()

    def encode_edits(
        self, images: Sequence[ImageInput], prompts: Sequence[str], targets: Sequence[str]
    ) -> EditStates:
        """Edit states for a batch without storing them: one per input, for `session(edits=...)`
        (a trainer's forward with the gate off). No gradient reaches the base model."""
        requests, loader = user_requests(images, prompts, targets)
        states = self._capture([request.sample() for request in requests], loader)
        return states_of(states, device=self._input_device)

    def remove(self, edit_id: EditId) -> None:
        """Forget one edit (KeyError for an unknown id)."""
        self.memory.remove(edit_id)

    def edits(self) -> list[EditInfo]:
        """The stored edits, oldest first."""
        return self.memory.entries()

    def _forward_of(self, batch: Any) -> functools.partial:
        """The model's forward on an encoded batch, as a call for `LayerTrace.run`."""
        return functools.partial(
            self.backbone.forward_logits,
            self.model,
            batch.input_ids,
            batch.attention_mask,
            batch.pixel_values,
        )

    @property
    def _input_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _capture(
        self, samples: Sequence[Sample], load_image: ImageLoader
    ) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """(text states, visual states, gate key parts) of each sample (`capture_states`)."""
        return capture_states(self.model, self.processor, self.backbone, self.hooks, self.config,
                              samples, load_image, batch_size=self.batch_size,
                              device=self._input_device)

    # -- files --------------------------------------------------------------------------------

    def folder_meta(self) -> dict[str, Any]:
        """The adapter config: the resolved `DualEditConfig` and the base model's facts (the
        edits go to the memory files, not here)."""
        meta = super().folder_meta()
        del meta["edits"]
        if self.memory.gate_heads is not None:
            meta["gate_heads"] = heads_meta(self.memory.gate_heads)
        return meta

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The adapters' weights."""
        return dict(self.adapters.state_dict())

    def load_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
        """Load adapter tensors (strict names and shapes); the edits live in the memory files."""
        load_adapter_tensors(self.adapters, tensors, where=where)

    def write_files(self, writer: FolderWriter) -> list[str]:
        """The edit memory (`memory.json`, `memory.safetensors`) when edits are stored, and the
        fitted gate heads (`gate_heads.safetensors`) when there are any (none of an earlier save
        is kept otherwise)."""
        written = []
        heads = self.memory.gate_heads
        if heads is not None:
            writer.tensors(HEADS_FILE, heads.state_dict())
            written.append(HEADS_FILE)
        else:
            writer.drop(HEADS_FILE)
        if len(self.memory):
            return written + self.memory.write(writer)
        writer.drop(MEMORY_INDEX_FILE, MEMORY_STATES_FILE)
        return written

    def load_files(self, folder: EditorFolder) -> None:
        """The fitted gate heads and the stored edits, when the folder holds them."""
        if HEADS_FILE in folder.files:
            self.memory.set_gate_heads(heads_from(
                folder.meta.get("gate_heads", {}), folder.files[HEADS_FILE],
                str(folder.path / HEADS_FILE)))
        if MEMORY_INDEX_FILE in folder.files:
            states = folder.files.get(MEMORY_STATES_FILE)
            if states is None:
                raise FileNotFoundError(f"edit store file {folder.path / MEMORY_STATES_FILE} not found")
            self.memory.take(folder.files[MEMORY_INDEX_FILE], states, folder.path)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        processor: Any,
        directory: str | os.PathLike,
        backbone: Backbone | None = None,
        *,
        ignore_base_mismatch: bool = False,
        **overrides: Any,
    ) -> DualEditor:
        """An editor with the adapters (and stored edits) saved in `directory`; run-time fields
        (tau, gate, gate_scope, gate_key, use_text, use_visual, dtype) may be overridden, the
        architecture may not; `memory_device` and `batch_size` as for the constructor.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: another method's folder, another architecture or hidden size than the
                saved adapters', a changed architecture field, or weights that do not match
                (missing / unexpected keys).
        """
        return cls(model, processor, backbone, pretrained=str(directory),
                   ignore_base_mismatch=ignore_base_mismatch, **overrides)

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


def _layer_device(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device


def _layer_dtype(layer: nn.Module) -> torch.dtype:
    return next(layer.parameters()).dtype
