"""Low-rank weight updates of linear maps, per input row: how a gradient-based editor (MEND, KE)
is trained without writing the model's weights.

Such an editor turns an edit's gradient into an update dW = sum_r v_r u_r^T of a linear map W
(`Factors`: U [R, d_in], V [R, d_out]; R is at most the number of positions plus a few, so the
update never needs the dense [d_out, d_in] matrix in training). `RowUpdates` applies each row's
own update through forward hooks: y = x W^T + x dW^T = y + (x U^T) V, so a batch of n edits'
samples runs in one forward with input i edited by edit i, and the gradient flows into the
factors (and the editor network that made them). `dense` gives dW for writing an applied edit
into the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dualedit.editors.hooks import HookSet


@dataclass
class Factors:
    """A low-rank update dW = V^T U of one linear map, per edit.

    Attributes:
        u: [n, R, d_in] input-side factors.
        v: [n, R, d_out] output-side factors (scale and sign included).
    """

    u: torch.Tensor
    v: torch.Tensor

    def __post_init__(self) -> None:
        if self.u.dim() != 3 or self.v.dim() != 3 or self.u.shape[:2] != self.v.shape[:2]:
            raise ValueError(
                f"Factors: u [n, R, d_in] and v [n, R, d_out] needed, got {tuple(self.u.shape)} "
                f"and {tuple(self.v.shape)}"
            )

    def select(self, rows: torch.Tensor) -> Factors:
        """The factors of edit rows[i] for row i: [len(rows), R, ...]."""
        return Factors(self.u[rows], self.v[rows])

    def dense(self) -> torch.Tensor:
        """The summed update of all n edits: [d_out, d_in]."""
        return torch.einsum("nro,nri->oi", self.v, self.u)


class RowUpdates:
    """Per-row low-rank updates of some linear maps, through forward hooks owned by this object.

    Args:
        modules: {name: nn.Linear}.

    Example:
        >>> updates = RowUpdates({"l5.fc2": fc2})
        >>> with updates.applied({"l5.fc2": factors.select(each_row)}):
        ...     logits = model(**inputs).logits  # row i with its edit's update
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules = dict(modules)
        self._hooks = HookSet()
        self._current: dict[str, Factors] | None = None

    def applied(self, factors: Mapping[str, Factors]) -> _Applied:
        """A block in which each module's output gets its rows' updates."""
        unknown = sorted(set(factors) - set(self.modules))
        if unknown:
            raise KeyError(f"RowUpdates: no module {unknown} (modules: {sorted(self.modules)})")
        return _Applied(self, dict(factors))

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            factors = (self._current or {}).get(name)
            if factors is None:
                return None
            x = args[0]  # [b, s, d_in], or [b * s, d_in] (OPT flattens before its MLP)
            rows = factors.u.shape[0]
            if x.dim() == 2 and x.shape[0] % rows == 0:
                x = x.reshape(rows, -1, x.shape[-1])
            if x.dim() != 3 or x.shape[0] != rows:
                raise ValueError(
                    f"RowUpdates {name!r}: input {tuple(args[0].shape)}, factors for {rows} rows"
                )
            inner = torch.einsum("bsi,bri->bsr", x, factors.u.to(x.dtype))  # [b, s, R]
            update = torch.einsum("bsr,bro->bso", inner, factors.v.to(x.dtype))  # [b, s, d_out]
            return output + update.reshape(output.shape)

        return hook


class _Applied:
    def __init__(self, owner: RowUpdates, factors: dict[str, Factors]):
        self.owner, self.factors = owner, factors

    def __enter__(self) -> None:
        owner = self.owner
        if owner._current is not None:
            raise RuntimeError("RowUpdates: blocks do not nest")
        owner._current = self.factors
        for name, module in owner.modules.items():
            owner._hooks.forward_hook(module, owner._hook(name))

    def __exit__(self, *exc: object) -> None:
        self.owner._hooks.remove()
        self.owner._current = None
