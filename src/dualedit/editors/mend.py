"""MEND (Mitchell et al., "Fast Model Editing at Scale", ICLR 2022): small editor networks turn
the rank-1 factors of an edit's fine-tuning gradient into a weight update.

For each edited linear map W (by default the MLP maps of the last decoder layers) and each
position p of the edit sample, the gradient of the edit's NLL is delta_p x_p^T (x: the map's
input, delta: the gradient w.r.t. its output; `capture.LinearTrace`). MEND normalises x and delta
(running mean and variance, per network), concatenates them, and passes them through a residual
low-rank MLP that starts as the identity; its output splits into (x~, delta~) and the update is

    W' = W + lr_W * sum_p delta~_p x~_p^T,

with a learned step size lr_W per edited map. One network serves every map of the same shape
(MEND's sharing), with a per-map scale and shift ("modes"). Trained with the shared loop on the
edit loss of the generality samples and the locality KL (editors/gradient/train.py), as MEND's
multimodal ports run it (EasyEdit's MultimodalTrainer: c_edit 0.1 on the text and image
rephrases, c_loc 1 on both locality KLs).
"""

from __future__ import annotations

import dataclasses
import functools
import torch
from torch import nn

from dualedit.data.prompts import EncodedBatch
from dualedit.editors.gradient.editor import MLP_WEIGHTS, GradientEditor, check_targets
from dualedit.editors.gradient.train import train_gradient_editor
from dualedit.editors.lowrank import Factors
from dualedit.editors.spec import MethodSpec, Recipe
from dualedit.train.losses import PassOutput
from dualedit.options import check_positive
from dualedit.train.settings import TrainSettings

DEFAULT_WEIGHTS = MLP_WEIGHTS


@dataclasses.dataclass(frozen=True)
class MENDConfig:
    """MEND options.

    Attributes:
        layers: decoder layers whose MLP maps are edited (None: the last 3 of a real
            checkpoint, as MEND's configs, or the last 2 of the built-in world's 6-layer models).
        weights: MLP map names (`Backbone.mlp_linears`; None: `DEFAULT_WEIGHTS` of the type).
        rank: the inner width of the network's low-rank layers (MEND: 1920, capped at the
            input width).
        hidden_layers: residual layers after the first (MEND's n_hidden 1: two layers).
        edit_lr: the initial step size of every edited map (MEND: 1e-4); learned.
        lr_lr: the learning rate of the step sizes (MEND: 1e-4; None: the loop's rate).
        edit_weight, loc_weight: weights of the edit loss (on the generality samples) and of
            the locality KL in training (MEND: c_edit 0.1, c_loc 1).
        batch_size: edit samples per gradient forward in `apply`.
    """

    layers: tuple[int, ...] | None = None
    weights: tuple[str, ...] | None = None
    rank: int = 1920
    hidden_layers: int = 1
    edit_lr: float = 1e-4
    lr_lr: float | None = 1e-4
    edit_weight: float = 0.1
    loc_weight: float = 1.0
    batch_size: int = 8

    def __post_init__(self) -> None:
        layers, weights = check_targets("mend", self.layers, self.weights)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "weights", weights)
        check_positive("mend", "rank", self.rank, optional=False)
        check_positive("mend", "batch_size", self.batch_size, optional=False)
        check_positive("mend", "edit_lr", self.edit_lr, number=True, optional=False)
        check_positive("mend", "lr_lr", self.lr_lr, number=True)
        for name in ("edit_weight", "loc_weight"):
            check_positive("mend", name, getattr(self, name), number=True, optional=False)
        hidden = self.hidden_layers
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"mend option hidden_layers: an int >= 0, got {hidden!r}")


class RunningNorm(nn.Module):
    """Normalisation by the running mean and variance of every input seen in training (MEND
    normalises the gradient factors so that one network reads maps of any scale)."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("var", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, width] -> normalised [rows, width]; statistics updated in training mode."""
        if self.training and torch.is_grad_enabled() and x.shape[0]:
            self._update(x.detach().float())
        # abs(): a variance is never negative; loaded tensors are not trusted to say so.
        return (x - self.mean) / (self.var.abs().sqrt() + 1e-7)

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        # Chan et al.'s parallel update of mean and variance (rows x [rows, width]).
        n, count = x.shape[0], self.count.clamp_min(0.0)
        batch_mean, batch_var = x.mean(dim=0), x.var(dim=0, unbiased=False)
        total = count + n
        delta = batch_mean - self.mean
        mean = self.mean + delta * (n / total)
        m2 = self.var * count + batch_var * n + delta.square() * count * n / total
        self.mean.copy_(mean)
        self.var.copy_(m2 / total)
        self.count.copy_(total)


class LowRankResidual(nn.Module):
    """h = x + relu(scale_m * (U V x + b) + shift_m): MEND's layer; U starts at zero, so the
    layer starts as the identity. `m` selects the edited map (mode) within a shape's group."""

    def __init__(self, width: int, rank: int, modes: int):
        super().__init__()
        rank = min(rank, width)
        self.down = nn.Parameter(torch.randn(rank, width) / width**0.5)  # V
        self.up = nn.Parameter(torch.zeros(width, rank))  # U
        self.bias = nn.Parameter(torch.zeros(width))
        self.scale = nn.Parameter(torch.ones(modes, width))
        self.shift = nn.Parameter(torch.zeros(modes, width))

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        inner = (x @ self.down.T) @ self.up.T + self.bias  # [rows, width]
        return x + torch.relu(self.scale[mode] * inner + self.shift[mode])


class GradientTransform(nn.Module):
    """MEND's network for maps of one shape (d_in, d_out): [x; delta] -> [x~; delta~]."""

    def __init__(self, d_in: int, d_out: int, rank: int, hidden_layers: int, modes: int):
        super().__init__()
        self.d_in = d_in
        self.norm_x, self.norm_delta = RunningNorm(d_in), RunningNorm(d_out)
        self.layers = nn.ModuleList(
            LowRankResidual(d_in + d_out, rank, modes) for _ in range(hidden_layers + 1)
        )

    def forward(
        self, x: torch.Tensor, delta: torch.Tensor, mode: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [rows, d_in], delta [rows, d_out] -> (x~, delta~) of the same shapes."""
        h = torch.cat([self.norm_x(x), self.norm_delta(delta)], dim=-1)  # [rows, d_in + d_out]
        for layer in self.layers:
            h = layer(h, mode)
        return h[:, : self.d_in], h[:, self.d_in :]


class MENDNetwork(nn.Module):
    """One `GradientTransform` per target shape and a learned step size per target."""

    def __init__(self, shapes: dict[str, tuple[int, int]], config: MENDConfig):
        super().__init__()
        groups = sorted(set(shapes.values()))
        self.group_of = {name: groups.index(shape) for name, shape in shapes.items()}
        self.mode_of: dict[str, int] = {}
        for name in shapes:
            same = [other for other in shapes if self.group_of[other] == self.group_of[name]]
            self.mode_of[name] = same.index(name)
        self.transforms = nn.ModuleList(
            GradientTransform(
                d_in, d_out, config.rank, config.hidden_layers,
                sum(1 for g in self.group_of.values() if g == i),
            )
            for i, (d_in, d_out) in enumerate(groups)
        )
        self.names = list(shapes)
        self.edit_lrs = nn.Parameter(torch.full((len(shapes),), float(config.edit_lr)))


class MENDEditor(GradientEditor):
    """MEND on the MLP maps of the last decoder layers (see the module docstring)."""

    name = "mend"
    Config = MENDConfig

    DEFAULT_WEIGHTS = DEFAULT_WEIGHTS

    def build_network(self, shapes: dict[str, tuple[int, int]]) -> nn.Module:
        return MENDNetwork(shapes, self.config)

    def transform(
        self,
        inputs: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        mask: torch.Tensor,
        batch: EncodedBatch,
    ) -> dict[str, Factors]:
        net: MENDNetwork = self.network  # type: ignore[assignment]
        n, seq = mask.shape
        out: dict[str, Factors] = {}
        for i, name in enumerate(net.names):
            x, delta = inputs[name].float(), grads[name].float()  # [n, s, d_in], [n, s, d_out]
            # MEND drops the rows where either factor is zero (padding, positions after the
            # last target): they add nothing to the gradient and would skew the statistics.
            keep = mask & (x != 0).any(-1) & (delta != 0).any(-1)  # [n, s]
            transform = net.transforms[net.group_of[name]]
            x_t, delta_t = transform(x[keep], delta[keep], net.mode_of[name])  # [rows, ...]
            u = x.new_zeros(n, seq, x.shape[-1])
            v = x.new_zeros(n, seq, delta.shape[-1])
            u = u.masked_scatter(keep[..., None], x_t)
            v = v.masked_scatter(keep[..., None], delta_t * net.edit_lrs[i])
            out[name] = Factors(u, v)  # edit j's update: sum_p v[j, p] u[j, p]^T
        return out

    def objective(self, out: PassOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """c_edit * (NLL of the text and image rephrases) + c_loc * (both locality KLs): the
        edit sample itself only feeds the gradient, as MEND trains on its equivalents."""
        l_edit = out.nll["t_gen"].mean() + out.nll["v_gen"].mean()
        l_loc = out.kl["m_loc"].mean() + out.kl["t_loc"].mean()
        loss = self.config.edit_weight * l_edit + self.config.loc_weight * l_loc
        return loss, {"l_edit": l_edit, "l_loc": l_loc, "l_rel": out.nll["rel"].mean().detach()}

    def parameter_lrs(self) -> dict[str, float]:
        """MEND trains the step sizes at their own rate `lr_lr` (None: the loop's)."""
        return {} if self.config.lr_lr is None else {"edit_lrs": float(self.config.lr_lr)}


#: The built-in world's 6-layer models: see docs/results.md ("Baselines II").
RECIPE = Recipe(
    options={"rank": 256},
    train=TrainSettings(lr=1e-3, batch_size=8, max_steps=1000, eval_every=250, grad_clip=100.0),
)

METHOD = MethodSpec(
    name=MENDEditor.name,
    editor=MENDEditor,
    summary="MEND: editor networks turn the edit's gradient factors into a weight update of "
    "the last MLPs; trained",
    train=functools.partial(train_gradient_editor, editor_class=MENDEditor),
    recipe=RECIPE,
)
