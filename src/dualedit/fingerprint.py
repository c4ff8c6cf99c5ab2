"""The fingerprint of a base model's weights, recorded in every saved editor folder and checked
when the folder is loaded, so that an editor trained for one model does not load in silence onto
another model of the same shape.

It is made to survive what does not change the model: the device (GPU and CPU reduce in another
order), the dtype it was loaded in (bf16, fp16, fp32) and where it was loaded from. It holds the
parameters' names and shapes (hashed) and the mean absolute value of each parameter, compared
with a relative tolerance (`RTOL`): casting to bf16 moves a mean by far less, another
pretraining or fine-tune of the same architecture moves many by far more. A leaf module.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

#: Relative tolerance on each parameter's mean absolute value.
RTOL = 2e-3
FINGERPRINT_VERSION = 1


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """{"version", "structure" (hash of names and shapes), "mean_abs" (one float per parameter,
    sorted by name, 6 significant digits)}; one reduction per parameter on its own device."""
    structure = hashlib.sha256()
    means = []
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            structure.update(f"{name}|{tuple(p.shape)};".encode())
            mean = torch.linalg.vector_norm(p, ord=1, dtype=torch.float64) / max(p.numel(), 1)
            means.append(float(f"{float(mean):.6g}"))
    return {
        "version": FINGERPRINT_VERSION,
        "structure": structure.hexdigest()[:16],
        "mean_abs": means,
    }


def fingerprint_mismatch(saved: Any, now: dict[str, Any]) -> str | None:
    """Why `saved` (a folder's record) is not the fingerprint `now` of this model, or None."""
    if not isinstance(saved, dict) or saved.get("version") != FINGERPRINT_VERSION:
        return f"unreadable base-model fingerprint {str(saved)[:60]!r}"
    if saved.get("structure") != now["structure"]:
        return "the parameters' names or shapes differ"
    old, new = saved.get("mean_abs"), now["mean_abs"]
    if not isinstance(old, list) or len(old) != len(new):
        return "the number of parameters differs"
    far = [
        i
        for i, (a, b) in enumerate(zip(old, new, strict=True))
        if not isinstance(a, (int, float)) or abs(a - b) > RTOL * max(abs(a), abs(b), 1e-12)
    ]
    if far:
        return f"{len(far)} of {len(new)} parameters have other values"
    return None
