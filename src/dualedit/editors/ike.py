"""IKE, in-context knowledge editing (Zheng et al., "Can We Edit Factual Knowledge by In-Context
Learning?", EMNLP 2023), as MMEdit ran it on VLMs: no weight changes; the edit is stated as a new
fact in the input, after k demonstrations retrieved from a train split.

For an edit (prompt p, target t) the model reads, between the image and the question:

    demonstration_1 ... demonstration_k  "New Fact: p t\\nPrompt: " question

Each demonstration is a train record's own fact and one of three kinds (the paper's mix,
copy : update : retain = 1 : 3 : 4): *copy* asks the fact's own prompt and answers its new
target, *update* asks its rephrased prompt and answers the new target, *retain* asks an unrelated
question (the record's text or image locality question) and answers what the model answered.
The demonstrations are the k records nearest to the edit's fact, the nearest last (closest to
the question). Retrieval is lexical: idf-weighted bag-of-tokens cosine over the model's own
tokenizer (no sentence-embedding weights can be downloaded here); a Python caller may pass any
text encoder (`encoder=`, e.g. a sentence-transformers model's `encode`). With several edits
held, each question reads the stored fact nearest to it by the same similarity.

Demonstrations that do not fit the model's context are dropped, the least similar first.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dualedit.backbones import Backbone
from dualedit.data.prompts import EncodedBatch, PromptBatch
from dualedit.data.requests import EditRequest
from dualedit.editors.base import EditId, Editor, EditInfo, ImageLoader
from dualedit.editors.defaults import backbone_defaults
from dualedit.editors.prefix import PrefixedBatch, PromptFinder, insert_prefix
from dualedit.editors.retrieval import LexicalIndex
from dualedit.editors.spec import MethodSpec
from dualedit.editors.switch import Switchable
from dualedit.options import check_positive

logger = logging.getLogger(__name__)

#: (fact prefix, question prefix, separator) of the context templates. "ike": the IKE paper's
#: "New Fact: ... Prompt: ..." form; "plain": the fact then the question, no words around them
#: (for the built-in world's tokenizers, which know no word of "new fact" or "prompt").
TEMPLATES: dict[str, tuple[str, str, str]] = {
    "ike": ("New Fact: ", "\nPrompt: ", "\n\n"),
    "plain": ("", " . ", " . "),
}
#: The demonstration kinds in the IKE paper's proportions (copy : update : retain = 1 : 3 : 4).
KIND_SHARES: tuple[tuple[str, int], ...] = (("copy", 1), ("update", 3), ("retain", 4))

#: Per (model type, scale). "real": k = 32 demonstrations, as EasyEdit's multimodal IKE runs
#: BLIP-2 and MiniGPT-4 (its `--k` default 32), with the IKE paper's template. "small": chosen
#: on the 64 validation edits of both world datasets (k 0, 2, 4, 8 x both templates,
#: docs/experiments/tuning/ike-*.json): the small models were never taught to read a fact in
#: context, Rel stays at 0-3 whatever k, and every demonstration costs locality (LLaVA E-VQA
#: T-Loc 96.9 with k 0, 56.2 with k 4), so k 0 (the new fact alone) has the best Avg; the two
#: templates tie (mean Avg 33.5 "ike", 33.45 "plain").
DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("llava", "small"): {"k": 0, "template": "ike"},
    ("blip-2", "small"): {"k": 0, "template": "ike"},
    ("llava", "real"): {"k": 32, "template": "ike"},
    ("blip-2", "real"): {"k": 32, "template": "ike"},
}

RETRIEVERS: tuple[str, ...] = ("lexical", "encoder")
#: A text encoder: texts -> [n, d] embeddings (compared by cosine).
Encoder = Callable[[list[str]], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class IKEConfig:
    """IKE options.

    Attributes:
        k: demonstrations per edit (0: the new fact alone); None: the backbone's default.
        template: "ike" or "plain" (`TEMPLATES`); None: the backbone's default.
        demo_data: an MMEdit data folder whose train split gives the demonstrations (None: no
            demonstrations, the new fact alone).
        demo_task: "vqa" or "caption": which train split of `demo_data`.
        pool: retrieve from the first `pool` train records (None: all).
        retriever: "lexical" (idf-weighted bag of tokens of the model's tokenizer) or "encoder"
            (the text encoder given to the editor in Python, `IKEditor(..., encoder=f)`; set
            when one is given).
    """

    k: int | None = None
    template: str | None = None
    demo_data: str | None = None
    demo_task: str = "vqa"
    pool: int | None = None
    retriever: str = "lexical"

    def __post_init__(self) -> None:
        k = self.k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"ike option k: an int >= 0 or None, got {k!r}")
        if self.template is not None and self.template not in TEMPLATES:
            raise ValueError(
                f"ike option template: one of {sorted(TEMPLATES)}, got {self.template!r}"
            )
        if self.demo_task not in ("vqa", "caption"):
            raise ValueError(f"ike option demo_task: 'vqa' or 'caption', got {self.demo_task!r}")
        if self.demo_data is not None and not isinstance(self.demo_data, str):
            raise ValueError(f"ike option demo_data: a folder path, got {self.demo_data!r}")
        check_positive("ike", "pool", self.pool)
        if self.retriever not in RETRIEVERS:
            raise ValueError(f"ike option retriever: one of {RETRIEVERS}, got {self.retriever!r}")


@dataclasses.dataclass
class Fact:
    """One held edit: the tokens of its context and of its demonstrations (nearest last)."""

    id: EditId
    context: list[int]
    demonstrations: list[list[int]]
    question: str  # the edit's prompt, which a question is matched against


class IKEditor(Switchable, Editor):
    """In-context editing (see the module docstring). The model's weights are never touched;
    `logits` and `generate` read the prefixed input."""

    name = "ike"
    Config = IKEConfig

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        backbone: Backbone | None = None,
        *,
        encoder: Encoder | None = None,
        **kw: Any,
    ):
        super().__init__(model, processor, backbone, **kw)
        if encoder is not None:
            self.config = dataclasses.replace(self.config, retriever="encoder")
        elif self.config.retriever == "encoder":
            raise ValueError(
                "ike: retriever 'encoder' needs the text encoder itself: "
                "IKEditor(..., encoder=f) in Python, f(texts) -> [n, d] embeddings"
            )
        defaults = backbone_defaults(DEFAULTS, model, self.backbone)
        self.k = self.config.k if self.config.k is not None else defaults["k"]
        self.template = self.config.template or defaults["template"]
        self.encoder = encoder
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.facts: list[Fact] = []
        self._prompts = PromptFinder(processor, self.backbone)
        self._pool: _Pool | None = None
        #: (fact ids, their retrieval keys), built when several facts are first matched.
        self._fact_keys: tuple[tuple[EditId, ...], Any] | None = None
        text_config = getattr(model.config, "text_config", model.config)
        self.max_positions: int | None = getattr(text_config, "max_position_embeddings", None)

    def config_dict(self) -> dict[str, Any]:
        return {**super().config_dict(), "k": self.k, "template": self.template}

    # -- retrieval ----------------------------------------------------------------------------

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _pool_of_demonstrations(self) -> _Pool | None:
        """The train split's facts and demonstrations, read once (None: no `demo_data`)."""
        if self.config.demo_data is None or self.k == 0:
            return None
        if self._pool is None:
            from dualedit.data.mmedit import load_split

            split = load_split(self.config.demo_data, self.config.demo_task, "train")
            records = split[: self.config.pool] if self.config.pool else list(split)
            facts, demos = [], []
            fact_prefix, question_prefix, separator = TEMPLATES[self.template]
            for record in records:
                drawn = split.samples(record)
                rel = drawn["rel"]
                fact = rel.prompt + rel.target
                head = fact_prefix + fact + question_prefix
                asks = {
                    "copy": rel.prompt + rel.target,
                    "update": drawn["t_gen"].prompt + drawn["t_gen"].target,
                    "retain": drawn["t_loc"].prompt + drawn["t_loc"].target,
                }
                facts.append(fact)
                demos.append(
                    {kind: self._tokens(head + text + separator) for kind, text in asks.items()}
                )
            self._pool = _Pool(facts, demos, self._keys(facts))
        return self._pool

    def _keys(self, texts: list[str]) -> Any:
        if self.encoder is not None:
            embedded = torch.as_tensor(self.encoder(texts), dtype=torch.float32)  # [n, d]
            return torch.nn.functional.normalize(embedded, dim=-1)
        return LexicalIndex([self._tokens(text) for text in texts])

    def _nearest(self, keys: Any, query_texts: list[str], query_tokens: list[list[int]], k: int):
        """Indices of the `k` entries of `keys` nearest each query, nearest first."""
        if isinstance(keys, LexicalIndex):
            return [keys.nearest(tokens, k) for tokens in query_tokens]
        queries = self._keys(query_texts)  # [q, d]
        scores = queries @ keys.T  # [q, n]
        return scores.topk(min(k, scores.shape[1]), dim=1).indices.tolist()

    # -- edits --------------------------------------------------------------------------------

    def apply(
        self,
        requests: Sequence[EditRequest],
        images: ImageLoader,
        *,
        ids: Sequence[EditId] | None = None,
    ) -> list[EditId]:
        """Store each request as a new fact with its k retrieved demonstrations."""
        new_ids = self._new_ids(len(requests), ids)
        for request, edit_id in zip(requests, new_ids, strict=True):
            self.facts.append(self._fact(request, edit_id))
        self._hold(requests, new_ids)
        return new_ids

    def _fact(self, request: EditRequest, edit_id: EditId) -> Fact:
        fact_prefix, question_prefix, _ = TEMPLATES[self.template]
        sample = request.sample()
        fact = sample.prompt + sample.target
        demonstrations: list[list[int]] = []
        pool = self._pool_of_demonstrations()
        if pool is not None:
            (near,) = self._nearest(pool.keys, [fact], [self._tokens(fact)], self.k)
            kinds = demonstration_kinds(len(near))
            # The nearest goes last, next to the question.
            demonstrations = [pool.demos[j][kind] for j, kind in zip(reversed(near), kinds)]
        return Fact(
            id=edit_id,
            context=self._tokens(fact_prefix + fact + question_prefix),
            demonstrations=demonstrations,
            question=sample.prompt,
        )

    def restore(self) -> None:
        """Forget every fact (the weights were never written)."""
        self.facts = []
        self._held = []

    def remove(self, edit_id: EditId) -> None:
        """Forget one fact (KeyError for an unknown id)."""
        self._forget(edit_id)
        self.facts = [fact for fact in self.facts if fact.id != edit_id]

    def load_state(
        self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str
    ) -> None:
        """The saved facts (their demonstrations retrieved again from `demo_data`)."""
        super().load_state(meta, tensors, where)
        if tensors:
            raise ValueError(f"{where}: an ike folder holds no tensors, found {sorted(tensors)}")
        self.facts = [self._fact(_request_of(info), info.id) for info in self._held]

    # -- the forward --------------------------------------------------------------------------

    def prefixed(self, batch: EncodedBatch | PromptBatch) -> PrefixedBatch | None:
        """`batch` with each row's fact and demonstrations inserted before its question (None:
        no fact held, or the editor disabled)."""
        if not self.facts or not self.active:
            return None
        parts = self._prompts(batch)
        rows, starts, questions = parts.rows, parts.starts, parts.questions
        facts = self._facts_for(questions)
        prefixes = [self._prefix(fact, len(row)) for fact, row in zip(facts, rows)]
        return insert_prefix(
            batch, prefixes, starts, pad_id=int(self.tokenizer.pad_token_id), backbone=self.backbone
        )

    def _facts_for(self, questions: list[list[int]]) -> list[Fact]:
        """The held fact nearest each question (the only one when one is held)."""
        if len(self.facts) == 1:
            return [self.facts[0]] * len(questions)
        ids = tuple(fact.id for fact in self.facts)
        if self._fact_keys is None or self._fact_keys[0] != ids:
            self._fact_keys = (ids, self._keys([fact.question for fact in self.facts]))
        texts = [] if self.encoder is None else [self.tokenizer.decode(q) for q in questions]
        nearest = self._nearest(self._fact_keys[1], texts, questions, 1)
        return [self.facts[near[0]] for near in nearest]

    def _prefix(self, fact: Fact, length: int) -> list[int]:
        """The fact's demonstrations and context, least similar demonstrations dropped until the
        input fits the model's context."""
        demos = list(fact.demonstrations)
        budget = None if self.max_positions is None else self.max_positions - length
        while budget is not None and demos and sum(map(len, demos)) + len(fact.context) > budget:
            demos.pop(0)
        if budget is not None and len(fact.context) > budget:
            raise ValueError(
                f"ike: an input of {length} tokens with the new fact's {len(fact.context)} does "
                f"not fit the model's {self.max_positions} positions"
            )
        return [token for demo in demos for token in demo] + fact.context

    def logits(self, batch: EncodedBatch | PromptBatch) -> torch.Tensor:
        prefixed = self.prefixed(batch)
        if prefixed is None:
            return super().logits(batch)
        inner = prefixed.batch.to(batch.input_ids.device)
        logits = self.backbone.forward_logits(
            self.model, inner.input_ids, inner.attention_mask, inner.pixel_values
        )  # [batch, seq', vocab]
        return prefixed.logits_back(logits)  # [batch, seq, vocab]

    def generate(self, batch: PromptBatch, **generate_kwargs: Any) -> torch.Tensor:
        prefixed = self.prefixed(batch)
        if prefixed is None:
            return super().generate(batch, **generate_kwargs)
        inner = prefixed.batch.to(batch.input_ids.device)
        return self.backbone.generate(
            self.model, inner.input_ids, inner.attention_mask, inner.pixel_values,
            **generate_kwargs,
        )


def demonstration_kinds(k: int) -> list[str]:
    """The kinds of k demonstrations in the IKE proportions (largest remainder), interleaved
    so that the nearest ones (the last) mix kinds."""
    total = sum(share for _, share in KIND_SHARES)
    exact = [(kind, k * share / total) for kind, share in KIND_SHARES]
    counts = {kind: int(value) for kind, value in exact}
    order = sorted(exact, key=lambda item: item[1] - int(item[1]), reverse=True)
    for kind, _ in order[: k - sum(counts.values())]:
        counts[kind] += 1
    kinds: list[str] = []
    while len(kinds) < k:
        for kind, _ in KIND_SHARES:
            if counts[kind]:
                kinds.append(kind)
                counts[kind] -= 1
    return kinds


@dataclasses.dataclass
class _Pool:
    facts: list[str]
    demos: list[dict[str, list[int]]]
    keys: Any


def _request_of(info: EditInfo) -> EditRequest:
    return EditRequest(info.image, info.prompt or "", info.target or "")


METHOD = MethodSpec(
    name=IKEditor.name,
    editor=IKEditor,
    summary="IKE: the edit as a new fact in context after k retrieved demonstrations; untrained",
    train_data_option="demo_data",
    train_task_option="demo_task",
)
