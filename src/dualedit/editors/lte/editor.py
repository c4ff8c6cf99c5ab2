"""`LTEditor`: LTE, Learning to Edit (Jiang et al., "Learning to Edit: Aligning LLMs with
Knowledge Editing", ACL 2024), on a VLM as LiveEdit's `lte_vl` runs it.

A trained part of the model (a LoRA on the language model's attention maps, lora.py) has learned
to follow an updated fact written before a question. An edit is that fact, stored: `apply` keeps
each request's prompt and target (and their tokens); at query time each row reads the stored fact
nearest its question (k = 1, as LTE's sequential-editing config retrieves) between the image and
the question, in EasyEdit's LTE template:

    "Please acknowledge the updated information provided below and respond to the subsequent
    query.\\n\\n[Updated Information]:\\n{prompt} {target}\\n\\n[Query]:\\n" question

Retrieval is lexical (`retrieval.LexicalIndex`: idf-weighted bag of the model's tokens, cosine)
between the question's tokens and each fact's prompt tokens. LTE prefixes the nearest fact
always; with `threshold` set (LiveEdit uses 0.3) a question whose best score is below it reads
no fact. The base weights are never written: `restore` forgets the facts, `disabled()` turns off
the prefix and the LoRA, and `state_dict()` stays byte-identical throughout.

An editor that holds no edit computes the base model exactly (the unedited model of the editor
contract): the LoRA acts only while at least one fact is held (or inside `lora_forced()`, for
training), and then on every input, as the LTE model answers every query.

Files: `adapter_model.safetensors` holds the LoRA under PEFT's names (`lora.export_peft` writes a
PEFT adapter folder from it); the held facts are the folder's "edits" and are tokenised again on
load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from dualedit.backbones import Backbone
from dualedit.data.prompts import EncodedBatch, PromptBatch, Sample, encode_prompts
from dualedit.data.requests import EditRequest
from dualedit.editors.base import (
    EditId,
    Editor,
    EditInfo,
    ImageInput,
    ImageLoader,
    open_image,
)
from dualedit.editors.defaults import backbone_defaults
from dualedit.editors.lte.lora import TARGET_NAMES, LoRA, LoRAHooks, find_targets
from dualedit.editors.prefix import PrefixedBatch, PromptFinder, insert_prefix
from dualedit.editors.retrieval import LexicalIndex
from dualedit.editors.switch import Switchable
from dualedit.editors.weights import GradFlags, freeze
from dualedit.options import check_positive

logger = logging.getLogger(__name__)

#: EasyEdit's LTE evaluation (evaluate.py): the sentence before the updated information.
INTRO = (
    "Please acknowledge the updated information provided below and respond to the subsequent "
    "query.\n\n"
)
#: (text before "{prompt} {target}", text after it, before the question). "lte": EasyEdit's LTE
#: template; "plain": the fact then the question with no words around them, for the built-in
#: world's word-level tokenizers, which know none of the template's words.
TEMPLATES: dict[str, tuple[str, str]] = {
    "lte": (INTRO + "[Updated Information]:\n", "\n\n[Query]:\n"),
    "plain": ("", " . "),
}
#: Per (model type, scale): the template (the real checkpoints read LTE's; the small models'
#: tokenizers would turn its words into <unk>).
DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("llava", "small"): {"template": "plain"},
    ("blip-2", "small"): {"template": "plain"},
    ("llava", "real"): {"template": "lte"},
    ("blip-2", "real"): {"template": "lte"},
}


@dataclasses.dataclass(frozen=True)
class LTEConfig:
    """LTE options.

    Attributes:
        template: "lte" or "plain" (`TEMPLATES`); None: the backbone's default (small models
            "plain", real checkpoints "lte").
        threshold: None (LTE: the nearest fact is always prefixed), or a lexical cosine in
            [0, 1] below which a question reads no fact (LiveEdit's lte_vl uses 0.3).
        lora_r: LoRA rank (LTE's recipe: 8).
        lora_alpha: LoRA alpha; the update is scaled by alpha / r (LTE: 16).
        lora_dropout: dropout on the LoRA's input, in training only (LTE's 7B recipe: 0.05; 0
            suits the small models).
        lora_targets: which maps of each decoder layer get a LoRA: "q", "k", "v" (attention
            inputs), "o" (attention output), "mlp" (every map of the feed-forward block). LTE's
            recipe: ("q", "k", "v").
        lora_layers: decoder layer indices that get a LoRA (None: all).
    """

    template: str | None = None
    threshold: float | None = None
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q", "k", "v")
    lora_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.template is not None and self.template not in TEMPLATES:
            raise ValueError(
                f"lte option template: one of {sorted(TEMPLATES)} or null, got {self.template!r}"
            )
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or
                              not 0.0 <= t <= 1.0):
            raise ValueError(f"lte option threshold: a number in [0, 1] or null, got {t!r}")
        check_positive("lte", "lora_r", self.lora_r, optional=False)
        check_positive("lte", "lora_alpha", self.lora_alpha, number=True, optional=False)
        p = self.lora_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"lte option lora_dropout: a number in [0, 1), got {p!r}")
        targets = self.lora_targets
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
            raise ValueError(f"lte option lora_targets: a non-empty list of {TARGET_NAMES}, "
                             f"got {targets!r}")
        unknown = [t for t in targets if t not in TARGET_NAMES]
        if unknown or len(set(targets)) != len(targets):
            raise ValueError(f"lte option lora_targets: distinct names of {TARGET_NAMES}, "
                             f"got {list(targets)!r}")
        object.__setattr__(self, "lora_targets", tuple(targets))
        layers = self.lora_layers
        if layers is not None:
            if isinstance(layers, int) or not isinstance(layers, (list, tuple)) or not layers:
                raise ValueError(f"lte option lora_layers: a non-empty list of layer indices or "
                                 f"null, got {layers!r}")
            bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if bad or len(set(layers)) != len(layers):
                raise ValueError(
                    f"lte option lora_layers: distinct ints >= 0, got {list(layers)!r}"
                )
            object.__setattr__(self, "lora_layers", tuple(layers))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists, so a saved config compares equal on resume)."""
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


@dataclasses.dataclass(frozen=True)
class Fact:
    """One held edit.

    Attributes:
        id: the edit's id.
        text: the fact, "{prompt} {target}".
        prefix: the tokens inserted before a question (the template around `text`).
        key: the tokens of the edit's prompt, which questions are matched against.
    """

    id: EditId
    text: str
    prefix: tuple[int, ...]
    key: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class FactChoice:
    """What `LTEditor.explain` reports for a question.

    Attributes:
        edit_id: the nearest held edit (None: no edit held).
        score: its lexical cosine with the question (None: no edit held).
        prefixed: whether the question reads that fact (False below `threshold`).
    """

    edit_id: EditId | None
    score: float | None
    prefixed: bool


class LTEditor(Switchable, Editor):
    """LTE (see the module docstring): a trained LoRA plus the nearest stored fact in context.

    Args:
        model, processor, backbone: the VLM, its processor, its backbone (None: looked up).
        config / **options: `LTEConfig` fields.

    The editor attaches on construction (the LoRA's hooks; the base model's `requires_grad`
    flags off); `detach()` removes the hooks and gives the flags back.

    Example:
        >>> editor = LTEditor.from_pretrained(model, processor, "runs/lte/best")
        >>> eid = editor.edit(image, "What colour is the ball? The answer is:", "blue")
        >>> editor.explain(image, "Which colour is the ball? The answer is:")
        FactChoice(edit_id=0, score=0.83, prefixed=True)
    """

    name = "lte"
    Config = LTEConfig

    def __init__(self, model: nn.Module, processor: Any, backbone: Backbone | None = None, **kw):
        super().__init__(model, processor, backbone, **kw)
        defaults = backbone_defaults(DEFAULTS, model, self.backbone)
        self.template: str = self.config.template or defaults["template"]
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.facts: list[Fact] = []
        self._index: tuple[tuple[EditId, ...], LexicalIndex] | None = None
        self._prompts = PromptFinder(processor, self.backbone)
        self._forced = False
        text_config = getattr(model.config, "text_config", model.config)
        self.max_positions: int | None = getattr(text_config, "max_position_embeddings", None)
        c = self.config
        targets = find_targets(model, self.backbone, c.lora_targets, c.lora_layers)
        self.lora = LoRA(targets, c.lora_r, c.lora_alpha, c.lora_dropout).eval()
        #: The first decoder layer the LoRA changes (training runs the layers below once).
        self.first_layer = min(self.lora.layers)
        self.hooks = LoRAHooks(self.lora, targets, self._lora_acts)
        self._grad_flags: GradFlags | None = None
        self.attach()

    def config_dict(self) -> dict[str, Any]:
        return {**super().config_dict(), "template": self.template}

    def parameters(self) -> Iterator[nn.Parameter]:
        """The LoRA's parameters (the only trained ones)."""
        return self.lora.parameters()

    # -- attaching ----------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self.hooks.attached

    def attach(self) -> None:
        """Hook the LoRA into the model and freeze the base model (a no-op when attached)."""
        if self.attached:
            return
        self._grad_flags = freeze(self.model)
        self.hooks.attach()

    def detach(self) -> None:
        """Remove the LoRA's hooks and give back the base model's `requires_grad` flags."""
        self.hooks.detach()
        if self._grad_flags is not None:
            self._grad_flags.give_back()
            self._grad_flags = None

    def _lora_acts(self) -> bool:
        return self.active and (self._forced or bool(self.facts))

    @contextlib.contextmanager
    def lora_forced(self) -> Iterator[None]:
        """Inside the block the LoRA acts even with no fact held (training passes); `disabled()`
        still turns it off."""
        outer, self._forced = self._forced, True
        try:
            yield
        finally:
            self._forced = outer

    # -- edits --------------------------------------------------------------------------------

    def fact_of(self, request: EditRequest, edit_id: EditId = -1) -> Fact:
        """The fact of a request in this editor's template (tokens of the model's tokenizer)."""
        sample = request.sample()
        text = sample.prompt + sample.target
        before, after = TEMPLATES[self.template]
        return Fact(
            id=edit_id,
            text=text,
            prefix=tuple(self._tokens(before + text + after)),
            key=tuple(self._tokens(sample.prompt)),
        )

    def apply(
        self,
        requests: Sequence[EditRequest],
        images: ImageLoader,
        *,
        ids: Sequence[EditId] | None = None,
    ) -> list[EditId]:
        """Store each request's fact (nothing is computed: the images are not read)."""
        new_ids = self._new_ids(len(requests), ids)
        facts = [self.fact_of(r, i) for r, i in zip(requests, new_ids, strict=True)]
        self.facts += facts
        self._hold(requests, new_ids)
        return new_ids

    def restore(self) -> None:
        """Forget every fact (the trained LoRA stays; with no fact it does not act)."""
        self.facts = []
        self._held = []
        self._index = None

    def remove(self, edit_id: EditId) -> None:
        """Forget one fact (KeyError for an unknown id)."""
        self._forget(edit_id)
        self.facts = [fact for fact in self.facts if fact.id != edit_id]

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- retrieval ----------------------------------------------------------------------------

    def nearest(self, questions: Sequence[Sequence[int]]) -> list[tuple[Fact, float]]:
        """Per question (its tokens): the held fact nearest it and their lexical cosine.

        Raises:
            ValueError: no fact is held.
        """
        if not self.facts:
            raise ValueError("lte: no fact is held")
        ids = tuple(fact.id for fact in self.facts)
        if self._index is None or self._index[0] != ids:
            self._index = (ids, LexicalIndex([list(fact.key) for fact in self.facts]))
        index = self._index[1]
        out = []
        for question in questions:
            j, score = index.best(list(question))
            out.append((self.facts[j], score))
        return out

    def choose(self, questions: Sequence[Sequence[int]]) -> list[Fact | None]:
        """Per question (its tokens): the fact it reads (None: no fact held, or the nearest
        scores below `threshold`)."""
        if not self.facts:
            return [None] * len(questions)
        return [fact if self._reads(score) else None for fact, score in self.nearest(questions)]

    def _reads(self, score: float) -> bool:
        return self.config.threshold is None or score >= self.config.threshold

    def explain(self, image: ImageInput, prompt: str) -> FactChoice:
        """Which held fact a question reads, and its score.

        Example:
            >>> editor.explain(None, "nq question: who leads the country?")
            FactChoice(edit_id=0, score=0.12, prefixed=True)
        """
        if not isinstance(prompt, str):
            raise TypeError(f"explain: prompt must be a string, got {type(prompt).__name__}")
        if not self.facts:
            return FactChoice(None, None, False)
        opened = None if image is None else open_image(image, 0)
        sample = Sample(None if opened is None else "query", prompt, "")
        batch = encode_prompts([sample], self.processor, self.backbone, lambda _: opened)
        _, _, questions = self._row_parts(batch)
        ((fact, score),) = self.nearest(questions)
        return FactChoice(fact.id, score, self._reads(score))

    # -- the forward --------------------------------------------------------------------------

    def _row_parts(
        self, batch: EncodedBatch | PromptBatch
    ) -> tuple[list[list[int]], list[int], list[list[int]]]:
        """Per row: its unpadded tokens, where its prompt's text starts, its question's tokens."""
        parts = self._prompts(batch)
        return parts.rows, parts.starts, parts.questions

    def prefixed_with(
        self, batch: EncodedBatch | PromptBatch, prefixes: Sequence[Sequence[int]]
    ) -> PrefixedBatch:
        """`batch` with `prefixes[i]` (tokens, may be empty) inserted before row i's question,
        on the batch's device.

        Raises:
            ValueError: a row with its prefix longer than the model's positions.
        """
        rows, starts, _ = self._row_parts(batch)
        return self._insert(batch, rows, starts, prefixes)

    def _insert(
        self,
        batch: EncodedBatch | PromptBatch,
        rows: list[list[int]],
        starts: list[int],
        prefixes: Sequence[Sequence[int]],
    ) -> PrefixedBatch:
        for row, prefix in zip(rows, prefixes, strict=True):
            if self.max_positions is not None and len(row) + len(prefix) > self.max_positions:
                raise ValueError(
                    f"lte: an input of {len(row)} tokens with its fact's {len(prefix)} does not "
                    f"fit the model's {self.max_positions} positions"
                )
        device = batch.input_ids.device
        prefixed = insert_prefix(
            batch.to("cpu"), prefixes, starts, pad_id=int(self.tokenizer.pad_token_id),
            backbone=self.backbone,
        )
        return PrefixedBatch(prefixed.batch.to(device), prefixed.index)

    def prefixed(self, batch: EncodedBatch | PromptBatch) -> PrefixedBatch | None:
        """`batch` with each row's nearest fact before its question (None: no fact held, the
        editor disabled, or no row reads a fact)."""
        if not self.facts or not self.active:
            return None
        rows, starts, questions = self._row_parts(batch)
        facts = self.choose(questions)
        if all(fact is None for fact in facts):
            return None
        prefixes = [() if fact is None else fact.prefix for fact in facts]
        return self._insert(batch, rows, starts, prefixes)

    def logits(self, batch: EncodedBatch | PromptBatch) -> torch.Tensor:
        prefixed = self.prefixed(batch)
        if prefixed is None:
            return super().logits(batch)
        inner = prefixed.batch
        logits = self.backbone.forward_logits(
            self.model, inner.input_ids, inner.attention_mask, inner.pixel_values
        )  # [batch, seq', vocab]
        return prefixed.logits_back(logits)  # [batch, seq, vocab]

    def generate(self, batch: PromptBatch, **generate_kwargs: Any) -> torch.Tensor:
        prefixed = self.prefixed(batch)
        if prefixed is None:
            return super().generate(batch, **generate_kwargs)
        inner = prefixed.batch
        return self.backbone.generate(
            self.model, inner.input_ids, inner.attention_mask, inner.pixel_values,
            **generate_kwargs,
        )

    # -- files --------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The LoRA tensors under PEFT's names (`base_model.model.<path>.lora_A.weight`)."""
        return self.lora.peft_state()

    def load_state(
        self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str
    ) -> None:
        """The saved LoRA (strict: missing, unexpected or misshapen tensors are named) and the
        saved facts (tokenised again)."""
        self.lora.load_peft_state(tensors, where=where)
        super().load_state(meta, tensors, where)
        self.facts = [self.fact_of(_request_of(info), info.id) for info in self._held]
        self._index = None


def _request_of(info: EditInfo) -> EditRequest:
    return EditRequest(info.image, info.prompt or "", info.target or "")
