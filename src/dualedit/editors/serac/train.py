"""Training SERAC's scope classifier and counterfactual model with the one training loop.

Per `EditBatch` of n edits (`SERACTrainable.loss`):
- L_cntr: the NLL of the counterfactual model reading the GOLD edit's prefix on the edit's rel,
  t_gen and v_gen rows (mean per edit, mean over edits);
- L_cls: SERAC's balanced BCE of the classifier (scope.balanced_bce) over every (edit, query)
  pair of the batch: in scope are (edit i, its rel / t_gen / v_gen prompts), out of scope every
  other pair (its m_loc and t_loc questions, and every query of the other edits: SERAC's
  `use_all_negatives`, the hard negatives);
- loss = edit_weight * L_cntr + scope_weight * L_cls.

Validation (`metrics`) routes as SERAC's validation does: each row compared with its own edit
only; in scope (p > threshold) it reads the counterfactual model's logits with that edit's
prefix, else the base model's. Rel / T-Gen / V-Gen accuracy and M-Loc / T-Loc agreement with
the base model follow (`train.losses.pass_output`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from dualedit.backbones import Backbone
from dualedit.data.mmedit import MMEditDataset
from dualedit.data.prompts import EncodedBatch
from dualedit.data.prompts import select_rows
from dualedit.editors.serac.editor import SERACConfig, SERACEditor
from dualedit.editors.serac.scope import balanced_bce, squared_distances
from dualedit.editors.weights import freeze
from dualedit.numerics import flush_denormals
from dualedit.editors.trained import EditorTrainable
from dualedit.train.data import EditBatch
from dualedit.train.devices import place_model
from dualedit.train.loop import train, validation_split
from dualedit.train.losses import ANSWER_KEYS, METRICS, pass_output, row_mean
from dualedit.train.settings import TrainResult, TrainSettings

logger = logging.getLogger(__name__)


class SERACTrainable(EditorTrainable):
    """SERAC's classifier and counterfactual model as the training loop trains them.

    The base model is frozen (flags given back on `close`); `module` holds the classifier
    ("scope") and the counterfactual model's language side ("counterfactual"; its vision side
    is the base's, frozen).

    Args:
        model, processor: the VLM, already where it trains (`place_model`).
        config: a `SERACConfig` or a dict of its fields (None: the defaults).
        backbone: where the model's layers are (None: looked up).

    Example:
        >>> trainable = SERACTrainable(model, processor, config={"counterfactual_layers": 4})
        >>> result = train(trainable, model, processor, train_split, out_dir="runs/serac")
    """

    name = SERACEditor.name

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        *,
        config: SERACConfig | dict[str, Any] | None = None,
        backbone: Backbone | None = None,
    ):
        self.editor = SERACEditor(model, processor, backbone, config=config)
        self.module = nn.ModuleDict(
            {"scope": self.editor.classifier, "counterfactual": self.editor.language}
        )
        self._flags = freeze(model, self.module.parameters())

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(list(self.module.parameters()))

    # -- the pass -------------------------------------------------------------------------------

    def scope_distances(self, batch: EditBatch) -> torch.Tensor:
        """Squared embedding distances [5n, n] of every query (the image rows' prompts, then
        the t_loc prompts) to every edit (the rel rows' "prompt target")."""
        editor, images = self.editor, batch.images
        edits = editor.encode_states(
            select_rows(images, _arange(batch.rows("rel"), images)), prompt_only=False
        )  # [n, hidden]
        queries = torch.cat(
            [
                editor.encode_states(images, prompt_only=True),
                editor.encode_states(batch.text, prompt_only=True),
            ]
        )  # [5n, hidden]
        return squared_distances(editor.classifier(queries), editor.classifier(edits))

    def in_scope_pairs(self, batch: EditBatch, device: torch.device) -> torch.Tensor:
        """[5n, n] bool: query row r is in scope of edit i (r is i's rel, t_gen or v_gen)."""
        n = batch.n
        positive = torch.zeros((5 * n, n), dtype=torch.bool, device=device)
        each = torch.arange(n, device=device)
        for key in ANSWER_KEYS:
            positive[batch.rows(key).start + each, each] = True
        return positive

    def gold_facts(self, batch: EditBatch) -> list[list[int]]:
        """Each edit's tokens, from its rel row (as `apply` takes them from the edit sample)."""
        rel = select_rows(batch.images, _arange(batch.rows("rel"), batch.images))
        return self.editor.fact_tokens(rel)

    def counterfactual_nll(self, batch: EditBatch, facts: list[list[int]]) -> torch.Tensor:
        """L_cntr: mean over edits of the mean token NLL of its rel, t_gen, v_gen rows, the
        counterfactual model reading the edit's prefix."""
        n, images = batch.n, batch.images
        answer = select_rows(images, torch.arange(len(ANSWER_KEYS) * n))
        prefixed = self.editor.prefixed(answer, [facts[r % n] for r in range(3 * n)])
        inner = prefixed.batch.to(images.input_ids.device)
        logits = self.editor.backbone.forward_logits(
            self.editor.counterfactual, inner.input_ids, inner.attention_mask, inner.pixel_values
        )  # [3n, seq', vocab]
        token_nll = F.cross_entropy(
            logits[inner.target_mask].float(), inner.target_ids[inner.target_mask],
            reduction="none",
        )  # [k]
        rows = inner.target_mask.nonzero()[:, 0]
        return row_mean(token_nll, rows, 3 * n).view(len(ANSWER_KEYS), n).mean(dim=0).mean()

    def loss(self, batch: EditBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """edit_weight * L_cntr + scope_weight * L_cls, and the two terms."""
        config = self.editor.config
        d2 = self.scope_distances(batch)  # [5n, n]
        l_cls = balanced_bce(d2, self.in_scope_pairs(batch, d2.device))
        l_cntr = self.counterfactual_nll(batch, self.gold_facts(batch))
        total = config.edit_weight * l_cntr + config.scope_weight * l_cls
        return total, {"l_cntr": l_cntr, "l_cls": l_cls}

    def metrics(self, batch: EditBatch) -> dict[str, torch.Tensor]:
        """Rel / T-Gen / V-Gen accuracy and T-Loc / M-Loc agreement of the routed prediction,
        each row compared with its own edit (module docstring), per edit in `METRICS` order."""
        editor, n, images, text = self.editor, batch.n, batch.images, batch.text
        d2 = self.scope_distances(batch)  # [5n, n]
        own = d2[torch.arange(5 * n, device=d2.device), torch.arange(5 * n, device=d2.device) % n]
        routed = torch.exp(-own) > editor.config.threshold  # [5n]
        facts = self.gold_facts(batch)
        base = editor.backbone.forward_logits(
            editor.model, images.input_ids, images.attention_mask, images.pixel_values
        )[images.target_mask]  # [k, vocab]
        text_base = editor.backbone.forward_logits(
            editor.model, text.input_ids, text.attention_mask
        )[text.target_mask]  # [k_text, vocab]
        cf = editor.counterfactual_logits(images, [facts[r % n] for r in range(4 * n)])
        text_cf = editor.counterfactual_logits(text, facts)
        logits = _routed(base, cf[images.target_mask], routed[: 4 * n], images)
        text_logits = _routed(text_base, text_cf[text.target_mask], routed[4 * n :], text)
        loc = images.target_mask.nonzero()[:, 0] // n == len(ANSWER_KEYS)  # m_loc positions
        out = pass_output(
            images, logits, base[loc], n,
            text=text, text_logits=text_logits, text_reference=text_base,
        )
        metrics = out.metrics()
        return {key: metrics[key] for key in METRICS}


def _arange(rows: slice, batch: EncodedBatch) -> torch.Tensor:
    return torch.arange(rows.start, rows.stop, device=batch.input_ids.device)


def _routed(
    base: torch.Tensor, cf: torch.Tensor, routed: torch.Tensor, batch: EncodedBatch
) -> torch.Tensor:
    """Per target position, the counterfactual logits where its row is routed, else the base's."""
    rows = batch.target_mask.nonzero()[:, 0]  # [k]
    return torch.where(routed.to(rows.device)[rows][:, None], cf, base)  # [k, vocab]


@flush_denormals()  # subnormal floats slow CPU training many times over (numerics.py)
def train_serac(
    model: nn.Module,
    processor: Any,
    train_dataset: MMEditDataset,
    *,
    config: SERACConfig | dict[str, Any] | None = None,
    settings: TrainSettings | None = None,
    out_dir: str | Path,
    val_fraction: float | None = None,
    resume: bool = True,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    **ignored: Any,
) -> TrainResult:
    """Train SERAC's scope classifier and counterfactual model on the train split; keep the best
    by validation.

    Args:
        model: the VLM; its weights are never changed (only `requires_grad` flags while
            training, given back at the end).
        config: a `SERACConfig` or a dict of its fields (None: the defaults).
        ignored: other methods' train options (e.g. DualEdit's `calibrate_tau`), unused.
        Others as `dualedit.train.loop.train`.

    Returns:
        The `TrainResult`; `best_dir` loads with `SERACEditor.from_pretrained`.

    Example:
        >>> result = train_serac(model, processor, load_split("world", "vqa", "train"),
        ...                      settings=TrainSettings(max_steps=1000), out_dir="runs/serac")
    """
    started = time.perf_counter()
    if ignored:
        logger.info("serac: train options %s are not SERAC's; ignored", sorted(ignored))
    settings = settings if settings is not None else TrainSettings()
    if accelerator is None:
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    validation_split(
        train_dataset, settings, val_fraction=val_fraction, processes=accelerator.num_processes
    )
    config = SERACEditor.make_config(config)  # refused before the model moves
    place_model(model, accelerator)
    trainable = SERACTrainable(model, processor, config=config)
    result = train(
        trainable, model, processor, train_dataset, settings=settings, out_dir=out_dir,
        val_fraction=val_fraction, resume=resume, progress=progress, accelerator=accelerator,
    )
    return dataclasses.replace(result, seconds=time.perf_counter() - started)
