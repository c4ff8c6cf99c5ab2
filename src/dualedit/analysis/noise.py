"""Sensitivity per modality per layer (the paper's Figure 2 a, b, c): Gaussian noise added to
one decoder layer's output at the text, the image or all positions, and how far the model's
next-token distributions at the answer positions move (KL(clean || noisy)).

Noise goes in through a `LayerTrace` edit (the layer's output replaced by a new tensor, nothing
patched); every other layer and the vision side run as usual. Samples: the "rel" samples with an
image, teacher forced (prompt + target); the KL is read at `batch.target_mask`, the positions
whose logits predict the answer tokens.

Positions noised:
    text: the prompt's text positions up to the last prompt token (`prompt_text_mask`), the
        BOS sink included (it is a text token);
    image: the image placeholder positions (`batch.image_mask`);
    all: every attended position: prompt text, image and the teacher-forced answer tokens.

Scale: "relative" (default) draws noise of standard deviation sigma * RMS of the clean layer
output over the positions being noised, per sample (hidden-state norms grow with depth, so noise
of a fixed size would make the later layers look robust); "absolute" uses sigma itself.
The noise of (layer, modality, sigma, batch) comes from a generator seeded from
(seed, layer, modality, sigma index, batch index): a rerun on the same device gives the same
numbers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dualedit.analysis.figures import pyplot, save_figure, write_json
from dualedit.analysis.inputs import AnalysisData, prompt_text_mask
from dualedit.editors.capture import LayerTrace

logger = logging.getLogger(__name__)

MODALITIES: tuple[str, ...] = ("text", "image", "all")
SCALES: tuple[str, ...] = ("relative", "absolute")
POSITIONS_NOTE = {
    "text": "prompt text positions up to the last prompt token, BOS sink included",
    "image": "image placeholder positions",
    "all": "every attended position: prompt text, image and teacher-forced answer tokens",
}
KL_NOTE = (
    "KL(clean || noisy) of the next-token distributions at the answer positions "
    "(batch.target_mask), mean over a sample's answer positions, then mean and population std "
    "over samples"
)


@dataclass(frozen=True)
class NoiseSettings:
    """What `run_noise` perturbs and how (recorded in noise.json).

    Attributes:
        sigmas: noise sizes, each finite and >= 0 (0 leaves the model unchanged).
        scale: "relative" (std = sigma * RMS of the noised clean states) or "absolute".
        modalities: which of `MODALITIES` to noise.
        seed: base of every noise generator's seed (>= 0).
    """

    sigmas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    scale: str = "relative"
    modalities: tuple[str, ...] = MODALITIES
    seed: int = 0

    def __post_init__(self) -> None:
        sigmas = tuple(self.sigmas)
        if not sigmas:
            raise ValueError("sigmas: at least one noise size is needed")
        for sigma in sigmas:
            if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
                raise ValueError(f"sigmas: {sigma!r} is not a number")
            if not math.isfinite(sigma) or sigma < 0:
                raise ValueError(f"sigmas: each must be finite and >= 0, got {sigma!r}")
        object.__setattr__(self, "sigmas", tuple(float(s) for s in sigmas))
        if self.scale not in SCALES:
            raise ValueError(f"scale: unknown {self.scale!r}; expected one of {SCALES}")
        modalities = (self.modalities,) if isinstance(self.modalities, str) else self.modalities
        modalities = tuple(modalities)
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(
                f"modalities: need distinct names from {MODALITIES}, got {modalities!r}"
            )
        object.__setattr__(self, "modalities", modalities)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: an int >= 0 is needed, got {self.seed!r}")


def position_masks(batch: Any) -> dict[str, torch.Tensor]:
    """{modality: [batch, seq] bool} of the positions each modality's noise goes to."""
    return {
        "text": prompt_text_mask(batch),
        "image": batch.image_mask,
        "all": batch.attention_mask.bool(),
    }


def masked_rms(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Root mean square of `hidden` [batch, seq, dim] over the positions of `mask` [batch, seq]
    and all features, per row: [batch] float32 (0 for a row without positions)."""
    h = hidden.float()
    total = (h.square() * mask[..., None]).sum(dim=(1, 2))  # [batch]
    count = mask.sum(1).float() * h.shape[-1]  # [batch]
    return (total / count.clamp(min=1)).sqrt()


def add_noise(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    sigma: float,
    *,
    scale: str,
    generator: torch.Generator,
) -> torch.Tensor:
    """`hidden` [batch, seq, dim] plus Gaussian noise at the positions of `mask` [batch, seq]: a
    new tensor of the same dtype; the other positions keep their exact values. The noise's std
    is `sigma` ("absolute") or `sigma` times each row's `masked_rms` ("relative")."""
    if scale == "relative":
        std = sigma * masked_rms(hidden, mask)  # [batch]
    else:
        std = torch.full((hidden.shape[0],), float(sigma), device=hidden.device)  # [batch]
    noise = torch.randn(hidden.shape, generator=generator, device=hidden.device)  # [b, s, d]
    gain = std[:, None, None] * mask[..., None].float()  # [batch, seq, 1]
    return (hidden.float() + noise * gain).to(hidden.dtype)


def noise_seed(seed: int, layer: int, modality: str, sigma_index: int, batch_index: int) -> int:
    """The generator seed of one (layer, modality, sigma, batch), well mixed from all five."""
    key = [seed, layer, MODALITIES.index(modality), sigma_index, batch_index]
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> 1)


def run_noise(
    data: AnalysisData,
    out_dir: str | os.PathLike,
    *,
    sigmas: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    scale: str = "relative",
    layers: Sequence[int] | None = None,
    modalities: Sequence[str] = MODALITIES,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """KL divergence of the answer distributions under noise on one layer's output, per layer,
    modality and sigma (see the module docstring for positions, scale and seeding).

    Args:
        data: the frozen model and records (`analysis_data`); its "rel" samples with an image.
        out_dir: where noise.json and the figures noise_<modality>.png, noise_layers.png go.
        sigmas, scale, modalities, seed: see `NoiseSettings`. layers: decoder layers to noise
            (default all). batch_size: samples per forward. progress: a tqdm bar.

    Returns:
        What noise.json holds: {"analysis", "source", "settings", "layers", "samples",
        "results": [{"layer", "modality", "sigma", "kl_mean", "kl_std"}], "rms": [{"layer",
        "text", "image", "all"}] (mean over samples of the clean output's RMS at those
        positions), "positions", "kl"}.

    Example:
        >>> result = run_noise(data, "out/noise", sigmas=(1.0,), layers=[8, 16, 24])
    """
    settings = NoiseSettings(tuple(sigmas), scale, tuple(modalities), seed)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    depth = data.depth
    chosen = _check_layers(layers, depth)
    model, backbone = data.model, data.backbone
    n_samples = sum(sample.has_image for _, sample in data.samples("rel"))
    if n_samples == 0:
        raise ValueError("run_noise: no 'rel' samples with an image among the records")
    kl: dict[tuple[int, str, int], list[torch.Tensor]] = {}
    rms: dict[tuple[int, str], list[torch.Tensor]] = {}
    batches = (b for _, b in data.batches("rel", batch_size) if b.pixel_values is not None)
    bar = tqdm(total=math.ceil(n_samples / batch_size) * len(chosen), desc="noise",
               unit="layer", disable=not progress)

    def forward(batch: Any) -> torch.Tensor:
        logits = backbone.forward_logits(
            model, batch.input_ids, batch.attention_mask, batch.pixel_values
        )  # [batch, seq, vocab]
        return logits[batch.target_mask].double().log_softmax(-1)  # [answers, vocab]

    with torch.no_grad(), bar:
        for batch_index, batch in enumerate(batches):
            masks = position_masks(batch)

            def record_rms(layer: int, hidden: torch.Tensor) -> torch.Tensor:
                for name, mask in masks.items():
                    rms.setdefault((layer, name), []).append(masked_rms(hidden, mask).cpu())
                return hidden

            with LayerTrace(model, backbone, chosen, retain=False, edit=record_rms):
                clean = forward(batch)  # [answers, vocab]
            for layer in chosen:
                for modality in settings.modalities:
                    for sigma_index, sigma in enumerate(settings.sigmas):
                        edit = _noise_edit(
                            masks[modality], sigma, settings.scale,
                            noise_seed(settings.seed, layer, modality, sigma_index, batch_index),
                        )
                        with LayerTrace(model, backbone, [layer], retain=False, edit=edit):
                            perturbed = forward(batch)  # [answers, vocab]
                        per_sample = answer_kl(clean, perturbed, batch.target_mask)
                        kl.setdefault((layer, modality, sigma_index), []).append(per_sample)
                bar.update(1)
    result = _result(data, settings, chosen, n_samples, kl, rms)
    out = Path(out_dir)
    write_json(out / "noise.json", result)
    for modality in settings.modalities:
        plot_modality(result, modality, out / f"noise_{modality}.png")
    plot_layers(result, out / "noise_layers.png")
    logger.info("noise: %d samples, layers %s -> %s", n_samples, chosen, out)
    return result


def _noise_edit(mask: torch.Tensor, sigma: float, scale: str, seed: int) -> Any:
    """A `LayerTrace` edit adding the noise of one generator seed at `mask`."""

    def edit(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=hidden.device)
        generator.manual_seed(seed)
        return add_noise(hidden, mask, sigma, scale=scale, generator=generator)

    return edit


def _check_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    if layers is None:
        return list(range(depth))
    chosen = list(layers)
    if not chosen:
        raise ValueError("layers: at least one decoder layer is needed")
    for layer in chosen:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < depth:
            raise ValueError(f"layers: {layer!r} is not a decoder layer in 0..{depth - 1}")
    return sorted(set(chosen))


def answer_kl(clean: torch.Tensor, noisy: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """KL(clean || noisy) at each answer position, averaged over each row's answer positions.

    Args:
        clean, noisy: [answers, vocab] log-probabilities at the positions of `target_mask`
            [batch, seq] (row-major order, as `logits[target_mask]` gives them).

    Returns:
        [batch] on the CPU (0 for a row without answer positions).
    """
    per_position = (clean.exp() * (clean - noisy)).sum(-1)  # [answers]
    full = torch.zeros(target_mask.shape, dtype=per_position.dtype, device=per_position.device)
    full[target_mask] = per_position  # [batch, seq]
    return (full.sum(1) / target_mask.sum(1).clamp(min=1)).cpu()


def _result(
    data: AnalysisData,
    settings: NoiseSettings,
    layers: list[int],
    n_samples: int,
    kl: dict[tuple[int, str, int], list[torch.Tensor]],
    rms: dict[tuple[int, str], list[torch.Tensor]],
) -> dict[str, Any]:
    results = []
    for layer in layers:
        for modality in settings.modalities:
            for sigma_index, sigma in enumerate(settings.sigmas):
                values = torch.cat(kl[(layer, modality, sigma_index)]).numpy()  # [samples]
                results.append({"layer": layer, "modality": modality, "sigma": sigma,
                                "kl_mean": float(values.mean()), "kl_std": float(values.std())})
    rms_rows = [
        {"layer": layer,
         **{m: float(torch.cat(rms[(layer, m)]).double().mean()) for m in MODALITIES}}
        for layer in layers
    ]
    return {
        "analysis": "noise",
        "source": data.source,
        "settings": {**asdict(settings), "sigmas": list(settings.sigmas),
                     "modalities": list(settings.modalities)},
        "layers": layers,
        "samples": n_samples,
        "results": results,
        "rms": rms_rows,
        "positions": POSITIONS_NOTE,
        "kl": KL_NOTE,
    }


def _curve(result: dict[str, Any], modality: str, sigma: float) -> list[float]:
    by_layer = {
        row["layer"]: row["kl_mean"] for row in result["results"]
        if row["modality"] == modality and row["sigma"] == sigma
    }
    return [float("nan") if by_layer[layer] is None else by_layer[layer]
            for layer in result["layers"]]


def _axes(ax: Any, curves: list[list[float]], layers: list[int], title: str) -> None:
    positive = [v for curve in curves for v in curve if v == v and v > 0]
    if positive and max(positive) / min(positive) > 20:
        # symlog: values spanning decades stay readable and exact zeros (image noise after the
        # last layer, which no later position reads) stay on the axis.
        ax.set_yscale("symlog", linthresh=min(positive))
    ax.set_xlabel("decoder layer noised")
    ax.set_ylabel("KL(clean || noisy) at answer positions")
    ax.set_title(title)
    ax.set_xticks(layers)
    ax.grid(alpha=0.3)
    ax.legend()


def plot_modality(result: dict[str, Any], modality: str, path: str | os.PathLike) -> Path:
    """KL against the noised layer for one modality, one line per sigma."""
    plt = pyplot()
    settings = result["settings"]
    fig, ax = plt.subplots(figsize=(7, 4))
    curves = []
    for sigma in settings["sigmas"]:
        curves.append(_curve(result, modality, sigma))
        ax.plot(result["layers"], curves[-1], marker="o", label=f"sigma = {sigma:g}")
    _axes(ax, curves, result["layers"],
          f"Noise on {modality} positions ({settings['scale']} scale, {result['samples']} samples)")
    return save_figure(fig, path)


def plot_layers(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """KL against the noised layer at the middle sigma, one line per modality."""
    plt = pyplot()
    settings = result["settings"]
    sigma = sorted(settings["sigmas"])[(len(settings["sigmas"]) - 1) // 2]
    fig, ax = plt.subplots(figsize=(7, 4))
    curves = []
    for modality in settings["modalities"]:
        curves.append(_curve(result, modality, sigma))
        ax.plot(result["layers"], curves[-1], marker="o", label=modality)
    _axes(ax, curves, result["layers"],
          f"Noise by modality at sigma = {sigma:g} ({settings['scale']} scale, "
          f"{result['samples']} samples)")
    return save_figure(fig, path)
