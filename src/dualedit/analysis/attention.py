"""Attention per modality per layer (the paper's Figure 1): how much the last prompt token of an
image question attends to the prompt's text, to the image, and to the BOS "sink" at each decoder
layer of the language model.

The weights come from the model's own attention modules run in eager mode: sdpa and flash
kernels never form the softmax matrix, so for this pass the language model is switched to eager
attention (`eager_attention`, restored afterwards, also on error) and a forward hook (in a
`HookSet`) on each decoder layer's self-attention keeps the query row of `batch.prompt_end`,
averaged over heads. `output_attentions=True` is not used: transformers 5 collects those through
output-capturing hooks it installs on the model once and never removes, and it would keep every
query row of every layer. Recomputing softmax(QK^T) from the projections instead would repeat
each architecture's rotary embeddings, grouped keys and masks, which eager mode already runs.

The samples are the "rel" samples with an image, teacher forced (prompt + target); the causal
mask lets the `prompt_end` row see only the prompt, so the weights equal those of the prompt
alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dualedit.analysis.figures import pyplot, save_figure, write_json
from dualedit.analysis.inputs import AnalysisData, bos_token_id, prompt_text_mask, sink_mask
from dualedit.backbones import Backbone
from dualedit.editors.capture import LayerTrace
from dualedit.editors.hooks import HookSet

logger = logging.getLogger(__name__)

#: Per-sample statistics of one layer's attention row, in the JSON's order.
STATS: tuple[str, ...] = (
    "text_mean", "image_mean", "image_top_k", "text_share", "image_share", "sink_share",
    "other_share",
)
ATTENTION_NOTE = (
    "eager attention in the language model for this pass (the model's own implementation "
    "restored afterwards); each decoder layer's self-attention weights (softmax over keys) of "
    "the query row batch.prompt_end (the last prompt token), averaged over heads; inputs are "
    "teacher-forced prompt + target, but the causal mask lets that row see only the prompt"
)
POSITIONS_NOTE = {
    "text": "prompt text positions at or before prompt_end, not image, without the sink",
    "image": "image placeholder positions (batch.image_mask)",
    "sink": "the first attended text position when it is the BOS token",
    "other": "any other position (padding, targets): 0 by the causal and padding masks",
}


def attention_implementations(config: Any) -> dict[str, Any]:
    """The attention implementation of a config and of its sub-configs, nested as
    `set_attn_implementation` takes them: {"": impl, "text_config": {"": impl, ...}, ...}."""
    tree: dict[str, Any] = {"": config._attn_implementation}
    for key in config.sub_configs:
        sub = getattr(config, key, None)
        if sub is not None:
            tree[key] = attention_implementations(sub)
    return tree


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run the language model (`config.text_config`) with eager attention inside the block; every
    config's implementation as before on exit, also when the block raises.

    Only the text sub-config changes: the vision side keeps its kernels (its weights are not
    read). `set_attn_implementation` changes config fields only, no weights.

    Example:
        >>> with eager_attention(model):
        ...     model(**inputs)  # attention modules of the language model return their weights
    """
    config = model.config
    if "text_config" not in config.sub_configs or getattr(config, "text_config", None) is None:
        raise ValueError(
            f"eager_attention: {type(model).__name__} config has no text_config sub-config"
        )
    saved = attention_implementations(config)
    try:
        model.set_attn_implementation({"text_config": "eager"})
        yield model
    finally:
        model.set_attn_implementation(saved)


class PromptEndAttention:
    """Keeps each decoder layer's attention row of the last prompt token during a forward.

    Hooks (a `HookSet`) on every decoder layer's self-attention module, registered on enter and
    removed on exit. Inside `call(prompt_end)` each forward fills `rows[layer]`: the head-mean
    weights [batch, seq] of query `prompt_end[b]` in row b. The model must run eager attention
    (see `eager_attention`); a module that returns no weights raises.
    """

    def __init__(self, model: nn.Module, backbone: Backbone):
        self.modules = [backbone.self_attention(model, i) for i in range(backbone.depth(model))]
        self.rows: dict[int, torch.Tensor] = {}
        self._prompt_end: torch.Tensor | None = None
        self._hooks = HookSet()

    def __enter__(self) -> PromptEndAttention:
        if not self._hooks.attached:
            for index, module in enumerate(self.modules):
                self._hooks.forward_hook(module, self._hook(index))
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove()

    @contextlib.contextmanager
    def call(self, prompt_end: torch.Tensor) -> Iterator[dict[int, torch.Tensor]]:
        """Record the rows `prompt_end` ([batch] long) of the forwards inside the block."""
        self.rows = {}
        self._prompt_end = prompt_end
        try:
            yield self.rows
        finally:
            self._prompt_end = None

    def _hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._prompt_end is None:
                return
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(weights, torch.Tensor):
                raise RuntimeError(
                    f"decoder layer {index}'s self-attention returned no weights: the language "
                    "model does not run eager attention (use eager_attention(model))"
                )
            rows = torch.arange(weights.shape[0], device=weights.device)
            end = self._prompt_end.to(weights.device)
            # weights [batch, heads, query, key] -> [batch, heads, key] -> [batch, key]
            self.rows[index] = weights[rows, :, end].float().mean(dim=1)

        return hook


def row_statistics(
    weights: torch.Tensor,
    text: torch.Tensor,
    image: torch.Tensor,
    sink: torch.Tensor,
    top_k: int,
) -> dict[str, torch.Tensor]:
    """Per-row statistics of attention rows: {stat: [batch]} for each of `STATS`.

    Args:
        weights: [batch, seq] attention of one query per row (sums to 1 over seq).
        text, image, sink: [batch, seq] bool, disjoint position sets.
        top_k: how many of the largest image weights `image_top_k` averages (fewer where a row
            has fewer image positions; NaN without any, as are means over empty sets).
    """
    text_share = (weights * text).sum(1)  # [batch]
    image_share = (weights * image).sum(1)  # [batch]
    sink_share = (weights * sink).sum(1)  # [batch]
    n_text = text.sum(1).float()  # [batch]
    n_image = image.sum(1).float()  # [batch]
    k = min(top_k, weights.shape[1])
    ranked = weights.masked_fill(~image, float("-inf")).sort(dim=1, descending=True).values
    ranked = ranked[:, :k]  # [batch, k]
    valid = torch.arange(k, device=weights.device)[None, :] < n_image[:, None]  # [batch, k]
    top = ranked.where(valid, torch.zeros_like(ranked)).sum(1) / valid.sum(1)  # [batch]
    nan = torch.full_like(text_share, float("nan"))
    return {
        "text_mean": torch.where(n_text > 0, text_share / n_text.clamp(min=1), nan),
        "image_mean": torch.where(n_image > 0, image_share / n_image.clamp(min=1), nan),
        "image_top_k": torch.where(n_image > 0, top, nan),
        "text_share": text_share,
        "image_share": image_share,
        "sink_share": sink_share,
        "other_share": weights.sum(1) - text_share - image_share - sink_share,
    }


def run_attention(
    data: AnalysisData,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    top_k: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Attention of the last prompt token to text, image and sink positions, per decoder layer.

    Args:
        data: the frozen model and records (`analysis_data`); its "rel" samples with an image.
        out_dir: where attention.json, attention.png and attention_share.png go.
        batch_size: samples per forward. top_k: image positions averaged in `image_top_k`.
        progress: show a tqdm bar over the batches.

    Returns:
        What attention.json holds: {"analysis", "source", "layers", "per_layer": [{"layer",
        "<stat>", "<stat>_std" for each of `STATS`}], "samples", "top_k", "attention",
        "positions"}. Means and (population) standard deviations over samples.

    Example:
        >>> result = run_attention(data, "out/attention")
        >>> [row["image_share"] for row in result["per_layer"]]
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, backbone = data.model, data.backbone
    n_samples = sum(sample.has_image for _, sample in data.samples("rel"))
    if n_samples == 0:
        raise ValueError("run_attention: no 'rel' samples with an image among the records")
    depth = data.depth
    bos = bos_token_id(data.processor)
    per_sample: dict[int, dict[str, list[torch.Tensor]]] = {
        layer: {stat: [] for stat in STATS} for layer in range(depth)
    }
    recorder = PromptEndAttention(model, backbone)
    batches = (b for _, b in data.batches("rel", batch_size) if b.pixel_values is not None)
    bar = tqdm(batches, total=math.ceil(n_samples / batch_size), desc="attention", unit="batch",
               disable=not progress)
    with torch.no_grad(), eager_attention(model), recorder:
        for batch in bar:
            with recorder.call(batch.prompt_end) as rows, LayerTrace(
                model, backbone, [depth - 1], retain=False, stop=True
            ) as trace:
                trace.run(lambda b=batch: backbone.forward_logits(
                    model, b.input_ids, b.attention_mask, b.pixel_values))
            sink = sink_mask(batch, bos)  # [batch, seq]
            text = prompt_text_mask(batch, first_token=sink)  # [batch, seq]
            for layer in range(depth):
                stats = row_statistics(rows[layer], text, batch.image_mask, sink, top_k)
                for stat, values in stats.items():
                    per_sample[layer][stat].append(values.cpu())
    per_layer = []
    for layer in range(depth):
        entry: dict[str, Any] = {"layer": layer}
        for stat in STATS:
            values = torch.cat(per_sample[layer][stat]).double().numpy()  # [samples]
            entry[stat] = _nan_stat(np.nanmean, values)
            entry[f"{stat}_std"] = _nan_stat(np.nanstd, values)
        per_layer.append(entry)
    result = {
        "analysis": "attention",
        "source": data.source,
        "layers": list(range(depth)),
        "per_layer": per_layer,
        "samples": n_samples,
        "top_k": top_k,
        "attention": ATTENTION_NOTE,
        "positions": POSITIONS_NOTE,
    }
    out = Path(out_dir)
    write_json(out / "attention.json", result)
    plot_attention(result, out / "attention.png")
    plot_shares(result, out / "attention_share.png")
    logger.info("attention: %d samples, %d layers -> %s", n_samples, depth, out)
    return result


def plot_attention(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Per layer: mean text weight, mean image weight and mean of the top-k image weights."""
    plt = pyplot()
    layers = result["layers"]
    fig, ax = plt.subplots(figsize=(7, 4))
    series = {
        "text (mean per token)": "text_mean",
        "image (mean per token)": "image_mean",
        f"image (mean of top-{result['top_k']})": "image_top_k",
    }
    plotted = []
    for label, stat in series.items():
        values = [_plot_value(row[stat]) for row in result["per_layer"]]
        plotted.extend(v for v in values if v == v)
        ax.plot(layers, values, marker="o", label=label)
    if plotted and min(plotted) > 0 and max(plotted) / min(plotted) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("attention weight of the last prompt token")
    ax.set_title(f"Attention per token by modality ({result['samples']} samples)")
    ax.set_xticks(layers)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_shares(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Per layer: the last prompt token's attention mass on text, image and the sink, stacked."""
    plt = pyplot()
    layers = result["layers"]
    fig, ax = plt.subplots(figsize=(7, 4))
    shares = [
        [_plot_value(row[stat], 0.0) for row in result["per_layer"]]
        for stat in ("text_share", "image_share", "sink_share")
    ]
    ax.stackplot(layers, *shares, labels=["text", "image", "sink (BOS)"], alpha=0.8)
    ax.set_ylim(0, 1)
    ax.set_xlim(layers[0], layers[-1] if len(layers) > 1 else layers[0] + 1)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("share of attention mass")
    ax.set_title(f"Attention mass of the last prompt token ({result['samples']} samples)")
    ax.set_xticks(layers)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def _nan_stat(fn: Callable[[np.ndarray], Any], values: np.ndarray) -> float:
    if values.size == 0 or np.isnan(values).all():
        return float("nan")
    return float(fn(values))


def _plot_value(value: float | None, missing: float = float("nan")) -> float:
    return missing if value is None or value != value else float(value)
