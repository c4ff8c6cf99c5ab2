"""KE, KnowledgeEditor (De Cao et al., "Editing Factual Knowledge in Language Models", EMNLP
2021): a hypernetwork reads the edit and its fine-tuning gradient and predicts a constrained
update of each edited weight.

A condition vector c encodes the edit (a bidirectional LSTM over the edit's token embeddings,
KE's `LSTMConditioner`; here the model's own frozen input embeddings of the edit's prompt and new
answer, image placeholders left out, as VLKEB's multimodal port conditions on text). For each
edited map W [d_out, d_in] a small network of c (Linear, tanh, Linear, weight-normalised) gives
row and column vectors and a scale, and

    alpha = softmax(a_row) a_col^T,   beta = softmax(b_row) b_col^T,
    W' = W + max_scale * sigmoid(eta) * (alpha * grad_W + beta),

with grad_W the gradient of the edit's NLL (alpha gates it elementwise, beta shifts it). Since
grad_W = sum_p delta_p x_p^T, the update is low rank: (softmax(a_row) * delta_p)(a_col * x_p)^T
per position plus the rank-1 beta (`lowrank.Factors`), never a dense matrix in training.

Training (the shared loop): the edit loss on the edit sample and its generality samples, and KE's
constraint on the locality KL as a Lagrangian, alpha_kl * (KL - margin), whose multiplier rises
while the KL exceeds the margin (KE trains it by gradient ascent; here softplus-parameterised so
it stays positive).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from dualedit.data.prompts import EncodedBatch
from dualedit.editors.gradient.editor import MLP_WEIGHTS, GradientEditor, check_targets
from dualedit.editors.gradient.train import train_gradient_editor
from dualedit.editors.lowrank import Factors
from dualedit.editors.spec import MethodSpec, Recipe
from dualedit.options import check_positive
from dualedit.train.losses import PassOutput
from dualedit.train.settings import TrainSettings

DEFAULT_WEIGHTS = MLP_WEIGHTS


@dataclasses.dataclass(frozen=True)
class KEConfig:
    """KE options.

    Attributes:
        layers: decoder layers whose MLP maps are edited (None: the last 3 of a real checkpoint,
            the last 2 of the built-in world's 6-layer models).
        weights: MLP map names (None: `DEFAULT_WEIGHTS` of the model type).
        lstm_width: the conditioner's LSTM width per direction (KE: 128).
        condition_width: the condition vector's width (KE: 1024).
        hidden: the hidden width of each map's network (KE: 128).
        max_scale: the update's largest scale (KE's training scripts: 1).
        margin: the locality KL the constraint allows (KE: 1e-3 for BART, decayed during
            training; fixed here).
        batch_size: edit samples per gradient forward in `apply`.
    """

    layers: tuple[int, ...] | None = None
    weights: tuple[str, ...] | None = None
    lstm_width: int = 128
    condition_width: int = 1024
    hidden: int = 128
    max_scale: float = 1.0
    margin: float = 1e-3
    batch_size: int = 8

    def __post_init__(self) -> None:
        layers, weights = check_targets("ke", self.layers, self.weights)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "weights", weights)
        for name in ("lstm_width", "condition_width", "hidden", "batch_size"):
            check_positive("ke", name, getattr(self, name), optional=False)
        check_positive("ke", "max_scale", self.max_scale, number=True, optional=False)
        check_positive("ke", "margin", self.margin, number=True, optional=False)


class Conditioner(nn.Module):
    """KE's edit encoder: a bidirectional LSTM over token embeddings, max-pooled over the
    edit's positions, then Linear + tanh to the condition width."""

    def __init__(self, embed_width: int, lstm_width: int, condition_width: int):
        super().__init__()
        self.lstm = nn.LSTM(embed_width, lstm_width, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * lstm_width, condition_width)

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """embeddings [n, seq, embed], mask [n, seq] bool (the edit's tokens) -> [n, cond]."""
        lengths = mask.sum(dim=1).clamp_min(1)  # [n]
        # The edit's tokens packed to the left, in order (image placeholders and padding out).
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # [n, seq]
        packed = embeddings.gather(1, order[..., None].expand_as(embeddings))
        sequences = nn.utils.rnn.pack_padded_sequence(
            packed.float(), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        states, _ = nn.utils.rnn.pad_packed_sequence(
            self.lstm(sequences)[0], batch_first=True
        )  # [n, longest, 2 * lstm], zeros after each edit's length
        valid = torch.arange(states.shape[1], device=states.device)[None] < lengths[:, None]
        pooled = states.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)  # [n, 2 lstm]
        return torch.tanh(self.out(pooled))


class ConditionedUpdate(nn.Module):
    """The update of one map [d_out, d_in] from the condition: rows, columns and a scale."""

    def __init__(self, d_in: int, d_out: int, condition_width: int, hidden: int):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.first = weight_norm(nn.Linear(condition_width, hidden))
        self.second = weight_norm(nn.Linear(hidden, 2 * (d_in + d_out) + 1))

    def forward(self, condition: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """condition [n, cond] -> (a_row [n, d_out], a_col [n, d_in], b_row, b_col, eta [n])."""
        out = self.second(torch.tanh(self.first(condition)))  # [n, 2 (d_in + d_out) + 1]
        a_col, a_row, b_col, b_row, eta = out.split(
            [self.d_in, self.d_out, self.d_in, self.d_out, 1], dim=-1
        )
        return a_row.softmax(dim=-1), a_col, b_row.softmax(dim=-1), b_col, eta.squeeze(-1)


class KENetwork(nn.Module):
    """The conditioner, one `ConditionedUpdate` per edited map, and the KL multiplier."""

    def __init__(self, shapes: dict[str, tuple[int, int]], embed_width: int, config: KEConfig):
        super().__init__()
        self.names = list(shapes)
        self.conditioner = Conditioner(embed_width, config.lstm_width, config.condition_width)
        self.updates = nn.ModuleList(
            ConditionedUpdate(d_in, d_out, config.condition_width, config.hidden)
            for d_in, d_out in shapes.values()
        )
        # softplus(raw) = 1 at the start, KE's initial multiplier.
        self.raw_multiplier = nn.Parameter(torch.tensor(math.log(math.e - 1.0)))


class KnowledgeEditor(GradientEditor):
    """KE on the MLP maps of the last decoder layers (see the module docstring)."""

    name = "ke"
    Config = KEConfig
    DEFAULT_WEIGHTS = DEFAULT_WEIGHTS

    def build_network(self, shapes: dict[str, tuple[int, int]]) -> nn.Module:
        width = self.model.get_input_embeddings().embedding_dim
        return KENetwork(shapes, width, self.config)

    def condition(self, batch: EncodedBatch) -> torch.Tensor:
        """The edit samples' condition vectors [n, cond]: prompt and new answer tokens."""
        with torch.no_grad():
            embeddings = self.model.get_input_embeddings()(batch.input_ids)  # [n, seq, embed]
        mask = batch.attention_mask.bool() & ~batch.image_mask
        return self.network.conditioner(embeddings.detach(), mask)

    def transform(
        self,
        inputs: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        mask: torch.Tensor,
        batch: EncodedBatch,
    ) -> dict[str, Factors]:
        net: KENetwork = self.network  # type: ignore[assignment]
        condition = self.condition(batch)  # [n, cond]
        out: dict[str, Factors] = {}
        for name, update in zip(net.names, net.updates, strict=True):
            x = inputs[name].float() * mask[..., None]  # [n, s, d_in]
            delta = grads[name].float() * mask[..., None]  # [n, s, d_out]
            a_row, a_col, b_row, b_col, eta = update(condition)
            scale = self.config.max_scale * torch.sigmoid(eta)  # [n]
            # (alpha * grad)_p = (a_row * delta_p)(a_col * x_p)^T; beta = b_row b_col^T.
            u = torch.cat([x * a_col[:, None], b_col[:, None]], dim=1)  # [n, s + 1, d_in]
            v = torch.cat([delta * a_row[:, None], b_row[:, None]], dim=1)  # [n, s + 1, d_out]
            out[name] = Factors(u, v * scale[:, None, None])
        return out

    def objective(self, out: PassOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Edit loss + alpha_kl * (KL - margin), alpha_kl trained to rise while KL > margin."""
        l_edit = out.nll["rel"].mean() + out.nll["t_gen"].mean() + out.nll["v_gen"].mean()
        kl = out.kl["m_loc"].mean() + out.kl["t_loc"].mean()
        multiplier = F.softplus(self.network.raw_multiplier)
        margin = self.config.margin
        # The network minimises alpha (KL - m); alpha maximises it (gradient ascent, as KE).
        constraint = multiplier.detach() * (kl - margin) - multiplier * (kl.detach() - margin)
        return l_edit + constraint, {
            "l_edit": l_edit, "l_loc": kl, "multiplier": multiplier.detach(),
        }


#: The built-in world's 6-layer models: see docs/results.md ("Baselines II").
RECIPE = Recipe(
    options={"condition_width": 256},
    train=TrainSettings(lr=1e-3, batch_size=8, max_steps=1000, eval_every=250),
)

METHOD = MethodSpec(
    name=KnowledgeEditor.name,
    editor=KnowledgeEditor,
    summary="KE: a hypernetwork conditioned on the edit turns its gradient into a constrained "
    "update of the last MLPs; trained",
    train=functools.partial(train_gradient_editor, editor_class=KnowledgeEditor),
    recipe=RECIPE,
)
