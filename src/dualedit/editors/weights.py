"""Weight snapshots and `requires_grad` freezing, shared by every method that touches the model.

A weight-editing method (FT-L, FT-V, KE, MEND, Transformer-Patcher) computes a change, writes it
into some of the model's tensors, and must be able to undo it exactly: `WeightSnapshot` keeps a
copy of those tensors taken before the first edit and copies it back, so `state_dict()` is
byte-identical afterwards. `swapped()` puts the original values in for the length of a block (an
editor's `disabled()`). `freeze` / `frozen` switch `requires_grad` off for the base model, on for
the parameters a method trains, and give every flag back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn


class WeightSnapshot:
    """A copy of a module's tensors (parameters and buffers) at construction.

    Args:
        module: the module whose `state_dict()` is copied (e.g. one MLP of the language model).

    Example:
        >>> snapshot = WeightSnapshot(mlp)
        >>> mlp.down_proj.weight.data += delta          # an edit
        >>> with snapshot.swapped():                    # the unedited layer inside the block
        ...     base_logits = model(**inputs).logits
        >>> snapshot.restore()                          # byte-identical to before the edit
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.saved: dict[str, torch.Tensor] = {
            name: tensor.detach().clone() for name, tensor in self._live().items()
        }

    def _live(self) -> dict[str, torch.Tensor]:
        return dict(self.module.state_dict(keep_vars=True))

    def restore(self) -> None:
        """Copy the saved values back into the module's tensors (in place, same storage)."""
        with torch.no_grad():
            for name, tensor in self._live().items():
                tensor.copy_(self.saved[name])

    def changed(self) -> list[str]:
        """Names of the tensors whose values differ from the snapshot now."""
        live = self._live()
        return [name for name, saved in self.saved.items() if not torch.equal(live[name], saved)]

    def current(self) -> dict[str, torch.Tensor]:
        """Detached copies of the module's tensors as they are now (for saving an edited state)."""
        return {name: tensor.detach().clone() for name, tensor in self._live().items()}

    def load(self, tensors: dict[str, torch.Tensor], *, where: str = "weights") -> None:
        """Write `tensors` (names and shapes of the module's) into the module.

        Raises:
            ValueError: missing or unexpected names, or a shape that differs (named).
        """
        live = self._live()
        check_tensors(live, tensors, where=where)
        with torch.no_grad():
            for name, tensor in tensors.items():
                live[name].copy_(tensor)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the module holds the saved values; the current ones come back after."""
        edited = self.current()
        self.restore()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, tensor in self._live().items():
                    tensor.copy_(edited[name])


def check_tensors(
    own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], *, where: str
) -> None:
    """Strict loading's check: `given` has exactly the names of `own`, each with its shape.

    Raises:
        ValueError: missing or unexpected names, or a shape that differs (named, with `where`).
    """
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if missing or unexpected:
        raise ValueError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
    for name, tensor in given.items():
        if tensor.shape != own[name].shape:
            raise ValueError(
                f"{where}: {name} has shape {tuple(tensor.shape)}, it needs "
                f"{tuple(own[name].shape)}"
            )


class GradFlags:
    """The `requires_grad` flags of a model's parameters, saved to be given back later."""

    def __init__(self, model: nn.Module):
        self._flags = [(p, p.requires_grad) for p in model.parameters()]

    def give_back(self) -> None:
        """Set every parameter's flag to what it was when saved."""
        for p, flag in self._flags:
            p.requires_grad_(flag)


def freeze(model: nn.Module, train: Iterable[nn.Parameter] = ()) -> GradFlags:
    """Switch `requires_grad` off for every parameter of `model`, on for `train`.

    Returns:
        The flags as they were (`give_back()` restores them).
    """
    flags = GradFlags(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in train:
        p.requires_grad_(True)
    return flags


@contextlib.contextmanager
def frozen(model: nn.Module, train: Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """`freeze(model, train)` for the block; flags given back and `train`'s gradients dropped
    after, whatever happens inside."""
    train = list(train)
    flags = freeze(model, train)
    try:
        yield
    finally:
        flags.give_back()
        for p in train:
            p.grad = None


class WeightEdits:
    """Mixin for editors that write their edits into some of the model's tensors (FT-L, FT-V,
    MEND, KE): one snapshot of `edited_module()` taken before the first edit, `restore` copies it
    back (byte-identical `state_dict()`), `disabled()` swaps the originals in for a block.

    Put it before `Editor` in the bases; the class defines `edited_module()`.
    """

    _snapshot: WeightSnapshot | None = None

    def edited_module(self) -> nn.Module:
        """The module whose tensors the edits are written into."""
        raise NotImplementedError

    def snapshot(self) -> WeightSnapshot:
        """The snapshot of the unedited tensors, taken now if no edit was written yet."""
        if self._snapshot is None:
            self._snapshot = WeightSnapshot(self.edited_module())
        return self._snapshot

    def restore(self) -> None:
        """Copy the original tensors back (byte-identical `state_dict()`); forget every edit."""
        if self._snapshot is not None:
            self._snapshot.restore()
            self._snapshot = None
        self._held = []

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """The original tensors for the block, the edited ones after."""
        if self._snapshot is None:
            return contextlib.nullcontext()
        return self._snapshot.swapped()

