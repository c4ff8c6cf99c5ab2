"""One DualEdit training step as the trainer runs it vs a naive step: time and peak memory.

- efficient: what `train_dualedit` does per step (train/loop.py with DualEdit's trainable):
  `edit_pass` (editors/dualedit/losses.py: the vision side and the layers below m = min(t, v)
  run once without gradient and serve the edit states, the locality reference and the edited
  pass; logits only at target positions), the loss, backward through layers >= m only, gradient
  clipping, Adam step.
- naive: the full model run from scratch for each purpose, as a straightforward implementation
  would: a frozen forward of the edit samples for their states, a full reference forward of the
  locality samples without gradient, and the edited full forward of every sample (logits at all
  positions) with gradient through every decoder layer (the embedding output is made to require
  grad, so backward runs through all of them); then the same loss, clipping and Adam step.
- naive_pruned: the naive step, but autograd left to prune the frozen prefix by itself (nothing
  before layer m requires grad): shows how much of the gain comes from backward alone.

The three compute the same loss and the same gradients (checked before timing; the JSON records
the largest differences). Target: naive / efficient >= 1.5.

Peak memory per variant is measured in a fresh subprocess per variant (the architectures one
after another in it): CPU: after one warm-up step (Adam state exists), the resident set size
before the step is read from /proc/self/status, the kernel's peak counter (VmHWM) is reset by
writing 5 to /proc/self/clear_refs, and the peak during one step minus the size before is the
figure; glibc is told to return every block of 64 KiB or more to the kernel on free
(MALLOC_MMAP_THRESHOLD_=65536) so that memory freed by the warm-up step is not silently reused.
Without /proc (not Linux) it falls back to the growth of ru_maxrss over a first step, an upper
bound. CUDA: torch.cuda.max_memory_allocated() minus the allocation before the step.

Usage: python benchmarks/train_step.py [--arch llava|blip2|both] [--out FILE] [--repeats N]
       [--quick] [--device cuda] [--dtype bfloat16] [--no-memory]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Variant  # noqa: E402

from dualedit.data.prompts import EncodedBatch  # noqa: E402
from dualedit.editors.dualedit import DualEditConfig, DualEditor  # noqa: E402
from dualedit.editors.dualedit.losses import (  # noqa: E402
    edit_pass,
    edit_states_from_prefix,
    prefix_layer,
)
from dualedit.train import TrainSettings  # noqa: E402
from dualedit.train.data import EditBatch, encode_edits_batch  # noqa: E402

TARGET_SPEEDUP = 1.5
VARIANTS = ("efficient", "naive", "naive_pruned")
QUICK_BATCH = 2
MMAP_THRESHOLD = "65536"


# -- the steps --------------------------------------------------------------------------------


class Trainer:
    """The editor, optimizer and one batch of one architecture, and the step variants."""

    def __init__(self, setup: common.Setup, batch_size: int):
        self.settings = TrainSettings(batch_size=batch_size)
        self.setup = setup
        self.model, self.backbone = setup.model, setup.backbone
        self.model.eval()  # as train_dualedit: no dropout
        self.editor = DualEditor(
            setup.model, setup.processor, setup.backbone, config=DualEditConfig()
        )
        # A trained adapter's output projection is not zero (a fresh one's is, which would zero
        # the gradient of every other adapter weight): seeded random, so the agreement check
        # compares every parameter's gradient. Timing does not depend on the values.
        generator = torch.Generator().manual_seed(common.SEED)
        with torch.no_grad():
            for adapter in (self.editor.text_adapter, self.editor.visual_adapter):
                weight = adapter.out.weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
        self.params = list(self.editor.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=self.settings.lr)
        records = [setup.train_split[i % len(setup.train_split)] for i in range(batch_size)]
        self.batch: EditBatch = encode_edits_batch(
            records, "vqa", setup.processor, setup.backbone, setup.train_split.images
        ).to(setup.device)

    # The loss of each variant (a scalar with a graph into the adapters).

    def efficient_loss(self) -> torch.Tensor:
        out = edit_pass(self.editor, self.batch, text_loc=self.settings.text_loc_kl)
        return out.loss(self.settings.text_loc_kl)[0]

    def naive_loss(self, every_layer: bool = True) -> torch.Tensor:
        editor, model, backbone, batch = self.editor, self.model, self.backbone, self.batch
        images, text, n = batch.images, batch.text, batch.n
        rel, loc = batch.rows("rel"), batch.rows("m_loc")
        with torch.no_grad(), editor.disabled():
            # The edit samples' states: their own frozen forward, stopped after layer max(t, v).
            edit_rows = _rows(images, rel)
            m = prefix_layer(editor)
            hidden = backbone.layer_input(
                model, m, edit_rows.input_ids, edit_rows.attention_mask, edit_rows.pixel_values
            )  # [n, seq, hidden]
            edits = edit_states_from_prefix(editor, hidden, edit_rows, slice(0, n))
            # The unedited reference: full forwards of the locality samples.
            loc_rows = _rows(images, loc)
            reference = _full_logits(backbone, model, loc_rows)[loc_rows.target_mask]
            text_reference = _full_logits(backbone, model, text)[text.target_mask]
        each = torch.arange(n, device=edits.text.device).repeat(len(images.input_ids) // n)
        grad_mode = _grad_from_embeddings(model) if every_layer else contextlib.nullcontext()
        with grad_mode:
            with editor.session(
                images.input_ids,
                images.attention_mask,
                images.prompt_end,
                edits=edits.select(each),
                gate=False,
            ):
                logits = _full_logits(backbone, model, images)  # [4n, seq, vocab]
            with editor.session(
                text.input_ids, text.attention_mask, text.prompt_end, edits=edits, gate=False
            ):
                text_logits = _full_logits(backbone, model, text)  # [n, seq, vocab]
        return _loss(
            logits[images.target_mask],
            images,
            reference,
            text_logits[text.target_mask],
            text,
            text_reference,
            n,
        )

    def losses(self) -> dict[str, Callable[[], torch.Tensor]]:
        return {
            "efficient": self.efficient_loss,
            "naive": self.naive_loss,
            "naive_pruned": lambda: self.naive_loss(every_layer=False),
        }

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One optimizer step as train_dualedit takes it (single process)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.lr
        loss = loss_fn()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in self.params:  # as loop._average_gradients: an unreached adapter gets zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        max_norm = self.settings.grad_clip if self.settings.grad_clip is not None else float("inf")
        torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        return loss.detach()

    def agreement(self) -> dict[str, Any]:
        """Loss and gradients of every variant on the same weights (no step taken)."""
        values, grads = {}, {}
        for name, loss_fn in self.losses().items():
            self.optimizer.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            values[name] = loss.item()
            grads[name] = [
                torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in self.params
            ]
        self.optimizer.zero_grad(set_to_none=True)
        scale = max(max(g.abs().max().item() for g in grads["efficient"]), 1e-30)
        out: dict[str, Any] = {"loss": values}
        for name in VARIANTS[1:]:
            diff = max(
                (a - b).abs().max().item()
                for a, b in zip(grads["efficient"], grads[name], strict=True)
            )
            out[f"{name}_loss_abs_diff"] = abs(values[name] - values["efficient"])
            out[f"{name}_grad_max_abs_diff"] = diff
            out[f"{name}_grad_rel_diff"] = diff / scale
        return out


def _rows(batch: EncodedBatch, rows: slice) -> EncodedBatch:
    """The rows of a batch (one image per row, so pixel rows follow)."""
    return EncodedBatch(
        input_ids=batch.input_ids[rows],
        attention_mask=batch.attention_mask[rows],
        pixel_values=None if batch.pixel_values is None else batch.pixel_values[rows],
        target_mask=batch.target_mask[rows],
        target_ids=batch.target_ids[rows],
        prompt_end=batch.prompt_end[rows],
        image_mask=batch.image_mask[rows],
    )


def _full_logits(backbone: Any, model: Any, batch: EncodedBatch) -> torch.Tensor:
    return backbone.forward_logits(model, batch.input_ids, batch.attention_mask, batch.pixel_values)


@contextlib.contextmanager
def _grad_from_embeddings(model: torch.nn.Module) -> Iterator[None]:
    """Within the block the token embeddings require grad, so every decoder layer is in the
    autograd graph and backward runs through all of them (as when nothing is frozen)."""

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _row_mean(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    total = values.new_zeros(n).index_add(0, rows, values)  # [n]
    return total / torch.bincount(rows, minlength=n).to(values.dtype)


def _kl(reference: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Per-position KL(reference || edited): [k, vocab] x2 -> [k]."""
    log_ref = F.log_softmax(reference.float(), dim=-1)
    log_edit = F.log_softmax(edited.float(), dim=-1)
    return (log_ref.exp() * (log_ref - log_edit)).sum(dim=-1)


def _loss(
    logits: torch.Tensor,
    images: EncodedBatch,
    reference: torch.Tensor,
    text_logits: torch.Tensor,
    text: EncodedBatch,
    text_reference: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """l_rel + l_gen + l_loc (paper eq. 5, with the text KL) from logits at target positions."""
    rows = images.target_mask.nonzero()[:, 0]  # [k]
    targets = images.target_ids[images.target_mask]  # [k]
    block = rows // n  # [k] rel, t_gen, v_gen, m_loc
    nll = F.cross_entropy(logits.float(), targets, reduction="none")  # [k]
    per_block = [_row_mean(nll[block == i], rows[block == i] - i * n, n).mean() for i in range(3)]
    loc = block == 3
    l_loc = _row_mean(_kl(reference, logits[loc]), rows[loc] - 3 * n, n).mean()
    text_rows = text.target_mask.nonzero()[:, 0]
    l_loc = l_loc + _row_mean(_kl(text_reference, text_logits), text_rows, n).mean()
    return per_block[0] + per_block[1] + per_block[2] + l_loc


# -- timing -----------------------------------------------------------------------------------


def bench_arch(setup: common.Setup, args: Any) -> dict[str, Any]:
    batch_size = QUICK_BATCH if args.quick else TrainSettings().batch_size
    trainer = Trainer(setup, batch_size)
    agreement = trainer.agreement()
    losses = trainer.losses()
    variants = [Variant(name, lambda f=losses[name]: trainer.step(f)) for name in VARIANTS]
    times = common.time_interleaved(variants, args.repeats, args.warmup, setup.device)
    trainer.editor.detach()
    # Time of each naive variant over the efficient step's.
    speedup = {name: common.ratio(times, name, "efficient") for name in VARIANTS[1:]}
    value = speedup["naive"]["ratio"]
    config = trainer.editor.config
    return {
        "source": setup.source,
        "batch_size": batch_size,
        "layers": {
            "text": config.text_layer,
            "visual": config.visual_layer,
            "prefix_m": prefix_layer(trainer.editor),
            "depth": setup.backbone.depth(setup.model),
        },
        "rows": {
            "image": int(trainer.batch.images.input_ids.shape[0]),
            "image_seq": int(trainer.batch.images.input_ids.shape[1]),
            "text": int(trainer.batch.text.input_ids.shape[0]),
        },
        "agreement": agreement,
        "times": {name: common.summary(s) for name, s in times.items()},
        "speedup": speedup,
        "target": {
            "ratio": "naive / efficient",
            "min": TARGET_SPEEDUP,
            "value": value,
            "met": value >= TARGET_SPEEDUP,
        },
    }


# -- memory (one subprocess per variant) --------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def measure_memory(trainer: Trainer, variant: str, steps: int = 2) -> dict[str, Any]:
    """Peak memory of one step of `variant` above what was in use before it (max over steps)."""
    loss_fn = trainer.losses()[variant]
    device = trainer.setup.device
    if device.type == "cuda":
        trainer.step(loss_fn)  # warm-up: Adam state, kernels
        peaks = []
        for _ in range(steps):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            trainer.step(loss_fn)
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - before)
        return {"peak_bytes": max(peaks), "method": "torch.cuda.max_memory_allocated delta"}
    if _can_reset_peak():
        trainer.step(loss_fn)
        peaks = []
        for _ in range(steps):
            gc.collect()
            before = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # reset VmHWM to the current RSS
            trainer.step(loss_fn)
            peaks.append((_status_kib("VmHWM") - before) * 1024)
        method = "VmHWM reset via clear_refs, minus VmRSS before"
        return {"peak_bytes": max(peaks), "method": method}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.step(loss_fn)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"peak_bytes": (after - before) * scale, "method": "ru_maxrss growth over a first step"}


def child_main(args: Any) -> None:
    """Measure one variant's memory for each architecture; print one JSON line."""
    out = {}
    with common.workdir() as tmp:
        for arch in common.archs_of(args):
            setup = common.load_setup(arch, args, Path(tmp))
            batch_size = QUICK_BATCH if args.quick else TrainSettings().batch_size
            trainer = Trainer(setup, batch_size)
            out[arch] = measure_memory(trainer, args.child_memory)
            trainer.editor.detach()
            del trainer, setup
            gc.collect()
    print(json.dumps(out))


def memory_in_subprocesses(args: Any) -> dict[str, dict[str, Any]]:
    """{arch: {variant: {"peak_bytes", "method"}}}, one subprocess per variant, run together."""
    command = [sys.executable, str(Path(__file__).resolve()), "--arch", args.arch,
               "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
               "--model", args.model]
    if args.quick:
        command.append("--quick")
    if args.decoder_layers is not None:
        command += ["--decoder-layers", str(args.decoder_layers)]
    command += ["--size", args.size]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    # Concurrent: each figure is its own process's memory, and no timing is taken meanwhile.
    running = {
        variant: subprocess.Popen(
            [*command, "--child-memory", variant],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for variant in VARIANTS
    }
    result: dict[str, dict[str, Any]] = {}
    for variant, process in running.items():
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"memory subprocess for {variant} failed:\n{stderr[-3000:]}")
        for arch, entry in json.loads(stdout.strip().splitlines()[-1]).items():
            result.setdefault(arch, {})[variant] = entry
    return result


# -- main -------------------------------------------------------------------------------------


def print_arch(arch: str, result: dict[str, Any]) -> None:
    layers = result["layers"]
    print(
        f"\n{arch} ({result['source']['kind']} model, {layers['depth']} decoder layers, "
        f"t={layers['text']} v={layers['visual']}, batch {result['batch_size']} edits = "
        f"{result['rows']['image']} image rows + {result['rows']['text']} text rows)"
    )
    memory = result.get("memory", {})
    rows = []
    for name, t in result["times"].items():
        peak = memory.get(name, {}).get("peak_bytes")
        speedup = result["speedup"].get(name, {})
        rows.append(
            {
                "variant": name,
                "median_ms": t["median_ms"],
                "p25_ms": t["p25_ms"],
                "p75_ms": t["p75_ms"],
                "time_vs_efficient": speedup.get("ratio", 1.0),
                "paired_median": speedup.get("paired_median"),
                "peak_MiB": None if peak is None else round(peak / 2**20, 2),
                "memory_vs_efficient": result.get("memory_ratio", {}).get(name),
            }
        )
    print(common.table(rows, ["variant", "median_ms", "p25_ms", "p75_ms", "time_vs_efficient",
                              "paired_median", "peak_MiB", "memory_vs_efficient"]))
    a = result["agreement"]
    print(f"agreement: naive grad rel diff {a['naive_grad_rel_diff']:.2e}, "
          f"pruned {a['naive_pruned_grad_rel_diff']:.2e}")
    target = result["target"]
    verdict = "met" if target["met"] else "NOT met"
    print(f"target {target['ratio']} >= {target['min']}: {target['value']:.3f} ({verdict})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser("train_step", __doc__.splitlines()[0])
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--child-memory", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common.check_args(args, repeats=10, warmup=2)
    if args.child_memory:
        child_main(args)
        return {}
    info = common.machine_info(args)
    results = {}
    with common.workdir() as tmp:
        for arch in common.archs_of(args):
            setup = common.load_setup(arch, args, Path(tmp))
            results[arch] = bench_arch(setup, args)
            del setup
            gc.collect()
    if not args.no_memory:
        memory = memory_in_subprocesses(args)
        for arch, entry in memory.items():
            results[arch]["memory"] = entry
            base = entry["efficient"]["peak_bytes"]
            results[arch]["memory_ratio"] = {
                name: round(e["peak_bytes"] / base, 4) if base > 0 else None
                for name, e in entry.items()
            }
    for arch, result in results.items():
        print_arch(arch, result)
    body = {"results": results, "target_speedup_min": TARGET_SPEEDUP,
            "memory_env": {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}}
    common.finish(args, "train_step", info, body)
    return body


if __name__ == "__main__":
    common.configure_logging()
    main()
