"""SERAC (Mitchell et al., "Memory-Based Model Editing at Scale", ICML 2022) on a frozen VLM:
a memory of edits, a scope classifier and a counterfactual model; the base weights are never
written.

- An edit is stored in the shared `EditStore`: its scope key (the frozen encoder's pooled states
  of the edit sample "prompt target" with its image, see scope.py; the trained MLP is applied
  when keys are compared, so loading classifier weights never leaves stale keys) and its info
  (prompt, target, image key and the edit's tokens, "fact").
- Routing (SERAC's hard routing, `supervised: true`): per input row the stored edit of the
  highest scope probability p; if p > `threshold` the counterfactual model answers, reading
  that edit as a text prefix before the question, with the row's own image; otherwise the base
  model answers (exactly its logits). Rows of the two kinds run as two sub-batches.
- The counterfactual model: SERAC's is a smaller model of the base's family; here a copy of the
  base VLM with its first `counterfactual_layers` decoder layers, initialised from the base
  weights, its language model trained (train.py). The vision side is the base's own modules
  (shared, frozen, never copied).

Example:
    >>> editor = SERACEditor.from_pretrained(model, processor, "runs/serac/best")
    >>> eid = editor.edit(image, "What colour is the ball? The answer is:", "blue")
    >>> editor.explain(image, "Which colour is the ball? The answer is:")
    ScopeDecision(edit_id=0, probability=0.93, routed=True)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from dualedit.backbones import Backbone
from dualedit.data.prompts import EncodedBatch, PromptBatch, Sample, encode, encode_prompts
from dualedit.data.prompts import group_by_image, select_rows
from dualedit.data.requests import EditRequest
from dualedit.editors.defaults import SMALL_DEPTH
from dualedit.editors.base import EditId, Editor, EditInfo, ImageInput, ImageLoader, open_image
from dualedit.editors.files import EditorFolder
from dualedit.editors.memory import EditStore, Field
from dualedit.editors.prefix import PrefixedBatch, PromptFinder, insert_prefix
from dualedit.editors.serac.scope import ScopeClassifier, encoded_states, squared_distances
from dualedit.editors.switch import Switchable
from dualedit.editors.weights import check_tensors
from dualedit.folders import FolderWriter
from dualedit.options import check_positive

logger = logging.getLogger(__name__)

#: (words before the edit, words between the edit and the question) of the counterfactual
#: model's prefix. "plain": SERAC's join, the edit's "prompt target" then the question (the
#: built-in world's tokenizers know no other word); "ike": IKE's "New Fact: ... Prompt: ".
TEMPLATES: dict[str, tuple[str, str]] = {
    "plain": ("", ""),
    "ike": ("New Fact: ", "\nPrompt: "),
}
MEMORY_INDEX_FILE = "memory.json"
MEMORY_TENSORS_FILE = "memory.safetensors"
MEMORY_FORMAT = 1
#: The classifier is initialised from this seed (the global RNG is left alone).
INIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class SERACConfig:
    """SERAC options.

    Attributes:
        scope_layer: the decoder layer (0-based) whose output, mean-pooled, the scope
            classifier reads; None: depth // 2 (resolved on the model and saved).
        scope_width: the classifier MLP's width (and its embedding's).
        counterfactual_layers: decoder layers kept in the counterfactual model (its first
            ones); None: all of the built-in world's 6-layer models, a quarter of a real
            checkpoint's (8 of LLaVA-1.5-7B's 32: SERAC's smaller model beside the base);
            resolved and saved.
        threshold: an input goes to the counterfactual model when its nearest edit's scope
            probability exceeds this (in (0, 1)).
        edit_weight: training weight of the counterfactual model's loss (SERAC's cedit).
        scope_weight: training weight of the classifier's balanced BCE (SERAC's cloc).
        template: the prefix's words (`TEMPLATES`).
        batch_size: edit samples per forward when adding edits.
    """

    scope_layer: int | None = None
    scope_width: int = 256
    counterfactual_layers: int | None = None
    threshold: float = 0.5
    edit_weight: float = 1.0
    scope_weight: float = 1.0
    template: str = "plain"
    batch_size: int = 8

    def __post_init__(self) -> None:
        layer = self.scope_layer
        bad_layer = isinstance(layer, bool) or not isinstance(layer, int) or layer < 0
        if layer is not None and bad_layer:
            raise ValueError(f"serac option scope_layer: an int >= 0 or null, got {layer!r}")
        check_positive("serac", "scope_width", self.scope_width, optional=False)
        check_positive("serac", "counterfactual_layers", self.counterfactual_layers)
        check_positive("serac", "batch_size", self.batch_size, optional=False)
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1:
            raise ValueError(f"serac option threshold: a number in (0, 1), got {t!r}")
        for name in ("edit_weight", "scope_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"serac option {name}: a number >= 0, got {value!r}")
        if self.edit_weight == 0 and self.scope_weight == 0:
            raise ValueError("serac options edit_weight and scope_weight are both 0")
        if self.template not in TEMPLATES:
            raise ValueError(
                f"serac option template: one of {sorted(TEMPLATES)}, got {self.template!r}"
            )


@dataclasses.dataclass(frozen=True)
class ScopeDecision:
    """What SERAC decides for one input (`SERACEditor.explain`).

    Attributes:
        edit_id: the stored edit of the highest scope probability (None: no edit held, or the
            editor disabled).
        probability: that edit's scope probability.
        routed: True when the counterfactual model answers (probability > threshold).
    """

    edit_id: EditId | None
    probability: float
    routed: bool


class SERACEditor(Switchable, Editor):
    """SERAC: scope classifier, counterfactual model, memory of edits (module docstring).

    Attributes:
        classifier: the scope classifier's trained MLP (`ScopeClassifier`).
        counterfactual: the truncated copy of the VLM (vision side shared with the base).
        language: the counterfactual model's trained parameters (all but the shared vision
            side's, tied ones once), the very tensors, as one module.
        store: the edits.
    """

    name = "serac"
    Config = SERACConfig

    def __init__(self, model: nn.Module, processor: Any, backbone: Backbone | None = None, **kw):
        super().__init__(model, processor, backbone, **kw)
        depth, hidden = self.backbone.depth(model), self.backbone.hidden_size(model)
        layer = self.config.scope_layer if self.config.scope_layer is not None else depth // 2
        if layer >= depth:
            raise ValueError(f"serac option scope_layer: {layer} out of range 0..{depth - 1}")
        # A real checkpoint's counterfactual model is a quarter of its depth, SERAC's smaller
        # model beside the base (t5-small beside t5-large); the 6-layer models keep all.
        small = depth < SMALL_DEPTH
        kept = self.config.counterfactual_layers or (depth if small else depth // 4)
        if kept > depth:
            raise ValueError(f"serac option counterfactual_layers: {kept} > the model's {depth}")
        self.config = dataclasses.replace(
            self.config, scope_layer=layer, counterfactual_layers=kept
        )
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            self.classifier = ScopeClassifier(hidden, self.config.scope_width).to(device)
        self.counterfactual = counterfactual_copy(model, self.backbone, kept)
        self.language = trained_part(self.counterfactual, self.backbone)
        self.store = EditStore({"pooled": Field(hidden, dtype=torch.float32)})
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("serac: the tokenizer has no pad token; set tokenizer.pad_token")
        self.pad_id = int(self.tokenizer.pad_token_id)
        before, after = TEMPLATES[self.config.template]
        self._before, self._after = self._tokens(before), self._tokens(after)
        self._prompts = PromptFinder(processor, self.backbone)
        self._version = 0  # bumped when the classifier's weights are loaded (key cache)
        text_config = model.config.get_text_config()
        self.max_positions: int | None = getattr(text_config, "max_position_embeddings", None)

    # -- edits --------------------------------------------------------------------------------

    def apply(
        self,
        requests: Sequence[EditRequest],
        images: ImageLoader,
        *,
        ids: Sequence[EditId] | None = None,
    ) -> list[EditId]:
        """Store each request's scope key and tokens (one frozen forward per batch of edit
        samples, stopping after `scope_layer`); returns their ids."""
        if ids is not None:
            if len(ids) != len(requests):
                raise ValueError(f"{len(ids)} ids for {len(requests)} edits")
            if len(set(ids)) != len(ids):
                raise ValueError(f"edit ids {list(ids)} are repeated")
            for edit_id in ids:
                self.store.new_id(edit_id)  # refused before anything is stored
        pooled, facts = self._encode_edits([r.sample() for r in requests], images)
        added = []
        for i, request in enumerate(requests):
            info = {"prompt": request.prompt, "target": request.target, "image": request.image,
                    "fact": facts[i]}
            added.append(
                self.store.add({"pooled": pooled[i]}, info, edit_id=None if ids is None else ids[i])
            )
        return added

    def _encode_edits(
        self, samples: Sequence[Sample], images: ImageLoader
    ) -> tuple[list[torch.Tensor], list[list[int]]]:
        pooled: list[Any] = [None] * len(samples)
        facts: list[Any] = [None] * len(samples)
        size = self.config.batch_size
        for rows in group_by_image(samples).values():
            for start in range(0, len(rows), size):
                chunk = rows[start : start + size]
                batch = encode([samples[i] for i in chunk], self.processor, self.backbone, images)
                states = self.encode_states(batch.to(self.device), prompt_only=False)
                for row, (i, fact) in enumerate(zip(chunk, self.fact_tokens(batch), strict=True)):
                    pooled[i], facts[i] = states[row], fact
        return pooled, facts

    def restore(self) -> None:
        """Forget every edit (the weights were never written)."""
        self.store.clear()

    def remove(self, edit_id: EditId) -> None:
        """Forget one edit (KeyError for an unknown id)."""
        self.store.remove(edit_id)

    def edits(self) -> list[EditInfo]:
        infos = [self.store.info(edit_id) for edit_id in self.store.ids]
        return [
            EditInfo(edit_id, info.get("prompt"), info.get("target"), info.get("image"))
            for edit_id, info in zip(self.store.ids, infos, strict=True)
        ]

    # -- encoder, prefix ------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def encode_states(
        self, batch: EncodedBatch | PromptBatch, *, prompt_only: bool
    ) -> torch.Tensor:
        """The frozen encoder's pooled states of a batch's rows: [batch, hidden] float32."""
        return encoded_states(
            self.model, self.backbone, self.config.scope_layer, batch, self.pad_id,
            prompt_only=prompt_only,
        )

    def _starts(self, batch: EncodedBatch | PromptBatch) -> tuple[list[list[int]], list[int]]:
        """Each row's unpadded tokens and where its prompt's text starts (after the head)."""
        parts = self._prompts(batch)
        return parts.rows, parts.starts

    def fact_tokens(self, batch: EncodedBatch) -> list[list[int]]:
        """The tokens of each row's "prompt target" (an edit sample's, without the head)."""
        rows, starts = self._starts(batch)
        return [row[start:] for row, start in zip(rows, starts, strict=True)]

    def prefixed(
        self, batch: EncodedBatch | PromptBatch, facts: Sequence[Sequence[int]]
    ) -> PrefixedBatch:
        """`batch` (on the CPU) with row i reading edit `facts[i]` (in the template) before its
        question."""
        rows, starts = self._starts(batch)
        prefixes = [self._before + list(fact) + self._after for fact in facts]
        longest = max(len(row) + len(prefix) for row, prefix in zip(rows, prefixes, strict=True))
        if self.max_positions is not None and longest > self.max_positions:
            raise ValueError(
                f"serac: an input with its edit prefix has {longest} tokens, more than the "
                f"model's {self.max_positions} positions"
            )
        return insert_prefix(
            batch.to("cpu"), prefixes, starts, pad_id=self.pad_id, backbone=self.backbone
        )

    def counterfactual_logits(
        self, batch: EncodedBatch | PromptBatch, facts: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """The counterfactual model's logits with row i reading `facts[i]`, on the batch's own
        positions: [batch, seq, vocab]."""
        prefixed = self.prefixed(batch, facts)
        inner = prefixed.batch.to(batch.input_ids.device)
        logits = self.backbone.forward_logits(
            self.counterfactual, inner.input_ids, inner.attention_mask, inner.pixel_values
        )  # [batch, seq', vocab]
        return prefixed.logits_back(logits)  # [batch, seq, vocab]

    # -- routing --------------------------------------------------------------------------------

    def _keys(self, device: torch.device) -> torch.Tensor:
        """The stored edits' scope embeddings [n_edits, width], kept until the edits or the
        classifier's weights change."""

        def build() -> torch.Tensor:
            with torch.no_grad():
                return self.classifier(self.store.stacked("pooled", device, cache=False))

        key = ("serac-keys", device, self._version, torch.is_inference_mode_enabled())
        return self.store.cached(key, build)

    def route(self, batch: EncodedBatch | PromptBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per row, the position in the store of its nearest edit and that edit's scope
        probability ([batch] long, [batch] float32); None when no edit acts (none held, or the
        editor disabled)."""
        if not self.active or not len(self.store):
            return None
        with torch.no_grad():
            queries = self.classifier(self.encode_states(batch, prompt_only=True))  # [b, width]
            d2 = squared_distances(queries, self._keys(queries.device))  # [b, n_edits]
            nearest, positions = d2.min(dim=1)
        return positions, torch.exp(-nearest)

    def _split(self, batch: EncodedBatch | PromptBatch):
        """(rows to the counterfactual model, the facts they read, rows to the base model)."""
        route = self.route(batch)
        if route is None:
            return None, [], None
        positions, probability = route
        routed = probability > self.config.threshold  # [batch]
        ids = self.store.ids
        cf_rows = routed.nonzero().squeeze(1)
        facts = [self.store.info(ids[p])["fact"] for p in positions[cf_rows].tolist()]
        return cf_rows, facts, (~routed).nonzero().squeeze(1)

    def logits(self, batch: EncodedBatch | PromptBatch) -> torch.Tensor:
        cf_rows, facts, base_rows = self._split(batch)
        if cf_rows is None or not len(cf_rows):
            return super().logits(batch)
        cf = self.counterfactual_logits(select_rows(batch, cf_rows), facts)
        if not len(base_rows):
            return cf
        base = super().logits(select_rows(batch, base_rows))  # [b_base, seq, vocab]
        out = cf.new_empty((batch.input_ids.shape[0], *cf.shape[1:]))
        out[cf_rows.to(out.device)] = cf
        out[base_rows.to(out.device)] = base
        return out

    def generate(self, batch: PromptBatch, **generate_kwargs: Any) -> torch.Tensor:
        cf_rows, facts, base_rows = self._split(batch)
        if cf_rows is None or not len(cf_rows):
            return super().generate(batch, **generate_kwargs)
        prefixed = self.prefixed(select_rows(batch, cf_rows), facts).batch
        prefixed = prefixed.to(batch.input_ids.device)
        cf = self.backbone.generate(
            self.counterfactual, prefixed.input_ids, prefixed.attention_mask,
            prefixed.pixel_values, **generate_kwargs,
        )  # [b_cf, new]
        if not len(base_rows):
            return cf
        base = super().generate(select_rows(batch, base_rows), **generate_kwargs)  # [b_base, new']
        pad = generate_kwargs.get("pad_token_id")
        pad = self.pad_id if pad is None else int(pad)
        out = cf.new_full((batch.input_ids.shape[0], max(cf.shape[1], base.shape[1])), pad)
        out[cf_rows.to(out.device), : cf.shape[1]] = cf
        out[base_rows.to(out.device), : base.shape[1]] = base.to(out.device)
        return out

    def explain(self, image: ImageInput, prompt: str) -> ScopeDecision:
        """The nearest stored edit of a question, its scope probability, and whether the
        counterfactual model answers it.

        Example:
            >>> editor.explain("ball.png", "Which colour is the ball? The answer is:")
            ScopeDecision(edit_id=0, probability=0.93, routed=True)
        """
        if not isinstance(prompt, str):
            raise TypeError(f"explain: prompt must be a string, got {type(prompt).__name__}")
        opened = None if image is None else open_image(image, 0)
        sample = Sample(None if opened is None else "query", prompt, "")
        batch = encode_prompts([sample], self.processor, self.backbone, lambda _: opened)
        route = self.route(batch.to(self.device))
        if route is None:
            return ScopeDecision(None, 0.0, False)
        positions, probability = route
        p = float(probability[0])
        return ScopeDecision(self.store.ids[int(positions[0])], p, p > self.config.threshold)

    # -- files ----------------------------------------------------------------------------------

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """The counterfactual model's trained parameters by their names in it (tied ones once)."""
        own = {id(p) for p in self.language.parameters()}
        return {n: p for n, p in self.counterfactual.named_parameters() if id(p) in own}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The classifier ("scope.*") and the counterfactual model's language side
        ("counterfactual.*"; its vision side is the base's)."""
        tensors = {f"scope.{k}": v.detach() for k, v in self.classifier.state_dict().items()}
        tensors.update(
            {f"counterfactual.{k}": p.detach() for k, p in self.trained_parameters().items()}
        )
        return tensors

    def load_state(
        self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str
    ) -> None:
        """Load the trained tensors strictly (ValueError naming missing, unexpected or misshapen
        ones); the edits are in the memory files."""
        check_tensors(self.state_tensors(), tensors, where=where)
        params = self.trained_parameters()
        scope = {k[len("scope."):]: v for k, v in tensors.items() if k.startswith("scope.")}
        self.classifier.load_state_dict(scope, strict=True)
        with torch.no_grad():
            for key, tensor in tensors.items():
                if key.startswith("counterfactual."):
                    params[key[len("counterfactual."):]].copy_(tensor)
        self._version += 1

    def folder_meta(self) -> dict[str, Any]:
        meta = super().folder_meta()
        del meta["edits"]  # in the memory files
        return meta

    def _memory_meta(self) -> dict[str, Any]:
        return {"format": MEMORY_FORMAT, "scope_layer": self.config.scope_layer,
                "hidden_size": self.store.fields["pooled"].width}

    def write_files(self, writer: FolderWriter) -> list[str]:
        """The edit store (memory.json, memory.safetensors) when edits are held."""
        if not len(self.store):
            writer.drop(MEMORY_INDEX_FILE, MEMORY_TENSORS_FILE)
            return []
        return self.store.write(
            writer, index_file=MEMORY_INDEX_FILE, tensors_file=MEMORY_TENSORS_FILE,
            meta=self._memory_meta(),
        )

    def load_files(self, folder: EditorFolder) -> None:
        """The stored edits, when the folder holds any (checked against this editor's encoder)."""
        if MEMORY_INDEX_FILE not in folder.files:
            return
        index_path = folder.path / MEMORY_INDEX_FILE
        tensors_path = folder.path / MEMORY_TENSORS_FILE
        if MEMORY_TENSORS_FILE not in folder.files:
            raise FileNotFoundError(f"edit store file {tensors_path} not found")
        index = folder.files[MEMORY_INDEX_FILE]
        for key, value in self._memory_meta().items():
            if index.get(key) != value:
                raise ValueError(
                    f"{index_path}: {key} is {index.get(key)!r}, this editor needs {value!r}"
                )
        for i, info in enumerate(index.get("info", [])):
            fact = info.get("fact") if isinstance(info, dict) else None
            if not isinstance(fact, list) or not all(isinstance(t, int) for t in fact):
                raise ValueError(f"{index_path}: edit {i} has no token list 'fact'")
        self.store.take(
            index, folder.files[MEMORY_TENSORS_FILE],
            index_path=index_path, tensors_path=tensors_path,
        )


def counterfactual_copy(model: nn.Module, backbone: Backbone, layers: int) -> nn.Module:
    """A copy of `model` with its first `layers` decoder layers, its vision side the very
    modules of `model` (not copied), its text config saying `layers` (so KV caches and
    generate() fit), in eval mode."""
    shared = [*backbone.vision_modules(model), *backbone.vision_parameters(model)]
    cf = copy.deepcopy(model, memo={id(obj): obj for obj in shared})
    decoder = backbone.decoder_layers(cf)
    del decoder[layers:]
    vision = {id(m) for top in backbone.vision_modules(cf) for m in top.modules()}
    configs = [m.config for m in cf.modules() if id(m) not in vision and hasattr(m, "config")]
    texts = [c.get_text_config() for c in configs if isinstance(c, PretrainedConfig)]
    for config in {id(c): c for c in texts}.values():
        config.num_hidden_layers = layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:layers]
    return cf.eval()


def trained_part(model: nn.Module, backbone: Backbone) -> nn.ParameterDict:
    """Every parameter of `model` outside its vision side (tied ones once), the very tensors,
    keyed by their names in `model` with "." as "-"."""
    vision = {id(p) for p in backbone.vision_parameters(model)}
    return nn.ParameterDict(
        {n.replace(".", "-"): p for n, p in model.named_parameters() if id(p) not in vision}
    )
