"""LoRA on a frozen model through forward hooks: the trained part of LTE.

For each target linear map W of the language model's decoder layers the hooks add a low-rank
update to its output,

    y = W x + (alpha / r) * B(A(dropout(x)))        A: [r, d_in], B: [d_out, r]

with A drawn as PEFT draws it (kaiming-uniform, a = sqrt(5): `nn.Linear`'s own init) and B zero,
so the update is the identity at initialisation. The model's modules and `state_dict()` are never
changed (no wrapped modules, no merged weights): `LoRA` holds the tensors, `LoRAHooks` owns the
forward hooks (one `HookSet`) and removes exactly those.

Targets are found through the backbone: the decoder layers (`backbone.decoder_layers`) and, in
each, the children named for the model type in `LAYER_CHILDREN` (never by matching module names
across the whole model: the vision tower also has `q_proj`). Tensors are named as PEFT names
them (`base_model.model.<module path>.lora_A.weight`), so `export_peft` writes a folder that
`peft.PeftModel.from_pretrained(base_model, folder)` loads onto the unchanged base checkpoint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dualedit.backbones import Backbone
from dualedit.editors.hooks import HookSet
from dualedit.editors.weights import check_tensors

#: The target names a config may list.
TARGET_NAMES: tuple[str, ...] = ("q", "k", "v", "o", "mlp")
#: Per model type, the children of one decoder layer that each target name covers.
LAYER_CHILDREN: dict[str, dict[str, tuple[str, ...]]] = {
    "llava": {  # LLaMA decoder layers
        "q": ("self_attn.q_proj",),
        "k": ("self_attn.k_proj",),
        "v": ("self_attn.v_proj",),
        "o": ("self_attn.o_proj",),
        "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    },
    "blip-2": {  # OPT decoder layers
        "q": ("self_attn.q_proj",),
        "k": ("self_attn.k_proj",),
        "v": ("self_attn.v_proj",),
        "o": ("self_attn.out_proj",),
        "mlp": ("fc1", "fc2"),
    },
}
#: PEFT's prefix of a tensor name (the `PeftModel` -> `LoraModel` -> base model path).
PEFT_PREFIX = "base_model.model."
PEFT_SUFFIXES: tuple[str, str] = (".lora_A.weight", ".lora_B.weight")
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
#: LoRA tensors are initialised from this seed (the global RNG is left alone).
INIT_SEED = 0


def layer_children(model_type: str, targets: Sequence[str]) -> tuple[str, ...]:
    """The child paths within one decoder layer of the target names `targets`, in order.

    Raises:
        ValueError: a model type without LoRA targets, or an unknown target name (named).

    Example:
        >>> layer_children("blip-2", ("q", "o"))
        ('self_attn.q_proj', 'self_attn.out_proj')
    """
    if model_type not in LAYER_CHILDREN:
        raise ValueError(
            f"LoRA: no target layout for model type {model_type!r} "
            f"(known: {sorted(LAYER_CHILDREN)})"
        )
    table = LAYER_CHILDREN[model_type]
    unknown = [t for t in targets if t not in table]
    if unknown:
        raise ValueError(f"LoRA: unknown target(s) {unknown}; known: {list(table)}")
    return tuple(child for t in targets for child in table[t])


def find_targets(
    model: nn.Module,
    backbone: Backbone,
    targets: Sequence[str],
    layers: Sequence[int] | None = None,
) -> dict[str, tuple[int, nn.Linear]]:
    """The target linear maps: {module path (as in `model.named_modules()`): (layer, module)}.

    Args:
        targets: target names (`TARGET_NAMES`).
        layers: decoder layer indices (None: all).

    Raises:
        ValueError: a layer out of range, a child a layer lacks (named by its path).
        TypeError: a child that is not an `nn.Linear`.
    """
    children = layer_children(model.config.model_type, targets)
    indices = range(backbone.depth(model)) if layers is None else sorted(set(layers))
    paths = {id(module): name for name, module in model.named_modules()}
    found: dict[str, tuple[int, nn.Linear]] = {}
    for index in indices:
        layer = backbone.layer(model, index)
        for child in children:
            try:
                module = layer.get_submodule(child)
            except AttributeError as error:
                raise ValueError(f"LoRA: decoder layer {index} has no {child!r}") from error
            path = paths[id(module)]
            if not isinstance(module, nn.Linear):
                raise TypeError(f"LoRA: {path} is a {type(module).__name__}, not an nn.Linear")
            found[path] = (index, module)
    return found


class LoRAPair(nn.Module):
    """The low-rank update of one linear map: x -> (alpha / r) * B(A(dropout(x))).

    Args:
        d_in, d_out: the map's input and output widths.
        r, alpha, dropout: LoRA's rank, scale numerator and input dropout (active only while
            this module is in training mode).
    """

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Linear(d_in, r, bias=False)  # kaiming-uniform (a = sqrt(5)), as PEFT
        self.lora_B = nn.Linear(r, d_out, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # identity at initialisation
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)  # [..., d_in]
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling  # [..., d_out]


class LoRA(nn.Module):
    """The LoRA tensors of one model's target maps (float32, each beside its map's weight).

    Args:
        targets: {module path: (layer, nn.Linear)} from `find_targets`.
        r, alpha, dropout: rank, alpha (the update is scaled by alpha / r), input dropout.

    Attributes:
        paths: the target module paths, in order; `pairs[i]` updates `paths[i]`.
        layers: the decoder layer of each target.
    """

    def __init__(
        self, targets: Mapping[str, tuple[int, nn.Linear]], r: int, alpha: float, dropout: float
    ):
        super().__init__()
        if not targets:
            raise ValueError("LoRA: no target maps")
        self.paths: list[str] = list(targets)
        self.layers: list[int] = [layer for layer, _ in targets.values()]
        self.r, self.alpha, self.dropout = r, alpha, dropout
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            pairs = [
                LoRAPair(linear.in_features, linear.out_features, r, alpha, dropout).to(
                    linear.weight.device
                )
                for _, linear in targets.values()
            ]
        self.pairs = nn.ModuleList(pairs)

    def peft_state(self) -> dict[str, torch.Tensor]:
        """The tensors under PEFT's names (detached copies)."""
        out: dict[str, torch.Tensor] = {}
        for path, pair in zip(self.paths, self.pairs, strict=True):
            out[PEFT_PREFIX + path + PEFT_SUFFIXES[0]] = pair.lora_A.weight.detach().clone()
            out[PEFT_PREFIX + path + PEFT_SUFFIXES[1]] = pair.lora_B.weight.detach().clone()
        return out

    def load_peft_state(self, tensors: Mapping[str, torch.Tensor], *, where: str) -> None:
        """Take over tensors named as `peft_state` names them (strict).

        Raises:
            ValueError: missing or unexpected names, or a shape that differs (named).
        """
        own = self.peft_state()
        check_tensors(own, tensors, where=where)
        with torch.no_grad():
            for path, pair in zip(self.paths, self.pairs, strict=True):
                for suffix, weight in zip(PEFT_SUFFIXES, (pair.lora_A.weight, pair.lora_B.weight)):
                    weight.copy_(tensors[PEFT_PREFIX + path + suffix])


class LoRAHooks:
    """The forward hooks that add `lora`'s updates to its target maps' outputs.

    Args:
        lora: the tensors.
        targets: the same {path: (layer, nn.Linear)} the `LoRA` was built from.
        acting: checked at each hooked call; the update is added only while it returns True
            (an editor's switch: attached, active, edits held or training).
    """

    def __init__(
        self,
        lora: LoRA,
        targets: Mapping[str, tuple[int, nn.Linear]],
        acting: Callable[[], bool],
    ):
        if list(targets) != lora.paths:
            raise ValueError("LoRAHooks: the targets are not the LoRA's own")
        self.lora = lora
        self.modules = [module for _, module in targets.values()]
        self.acting = acting
        self.hooks = HookSet()

    @property
    def attached(self) -> bool:
        return self.hooks.attached

    def attach(self) -> None:
        """Register one forward hook per target map (a no-op when attached)."""
        if self.attached:
            return
        for module, pair in zip(self.modules, self.lora.pairs, strict=True):
            self.hooks.forward_hook(module, self._hook(pair))

    def detach(self) -> None:
        """Remove exactly the hooks `attach` registered."""
        self.hooks.remove()

    def _hook(self, pair: LoRAPair) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            if not self.acting():
                return None
            update = pair(args[0])  # [..., d_out]
            return output + update.to(output.dtype)  # a new tensor, the output left alone

        return hook


# -- PEFT export -----------------------------------------------------------------------------------


def export_peft(editor_or_folder: Any, out_dir: str | os.PathLike) -> Path:
    """Write the LoRA of an LTE editor (or of its saved folder) as a PEFT adapter folder.

    The folder holds PEFT's `adapter_config.json` (`peft.LoraConfig` with the rank, alpha,
    dropout and the full module paths as `target_modules`, bias "none") and
    `adapter_model.safetensors` with the same tensors under the same names, so that
    `peft.PeftModel.from_pretrained(base_model, out_dir)` computes what the hooks compute; the
    base checkpoint stays unchanged on disk. Stored edits are not exported (PEFT has no notion of
    them: a PEFT user writes the prefix into the prompt).

    Args:
        editor_or_folder: an `LTEditor`, or the path of a folder it saved.
        out_dir: the PEFT adapter folder (created; its two files are replaced).

    Returns:
        `out_dir` as a Path.

    Raises:
        ValueError: a folder saved by another method, or tensors not named as LoRA tensors.

    Example:
        >>> export_peft("runs/lte/best", "runs/lte/peft")
        >>> peft_model = PeftModel.from_pretrained(base_model, "runs/lte/peft")
    """
    from peft import LoraConfig  # lazily: only the export needs peft
    from safetensors.torch import save_file

    if isinstance(editor_or_folder, (str, os.PathLike)):
        from dualedit.editors.files import read_editor_folder

        folder = read_editor_folder(editor_or_folder)
        if folder.meta.get("method") != "lte":
            raise ValueError(
                f"{folder.path}: saved by method {folder.meta.get('method')!r}, not 'lte'"
            )
        config, tensors = folder.meta["config"], folder.tensors
        base_model = folder.meta.get("base_model") or None
    else:
        config = editor_or_folder.config_dict()
        tensors = editor_or_folder.state_tensors()
        base_model = str(getattr(editor_or_folder.model.config, "name_or_path", "") or "") or None
    paths = _module_paths(tensors)
    peft_config = LoraConfig(
        r=int(config["lora_r"]),
        lora_alpha=config["lora_alpha"],
        lora_dropout=float(config["lora_dropout"]),
        target_modules=paths,
        bias="none",
        base_model_name_or_path=base_model,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_config.save_pretrained(str(out))
    save_file(
        {k: t.detach().cpu().contiguous() for k, t in tensors.items()},
        str(out / PEFT_WEIGHTS_FILE),
        metadata={"format": "pt"},
    )
    return out


def _module_paths(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The module paths of PEFT-named LoRA tensors (each with its A and B), in order."""
    paths: list[str] = []
    for name in tensors:
        if not name.startswith(PEFT_PREFIX) or not name.endswith(PEFT_SUFFIXES):
            raise ValueError(f"export_peft: {name!r} is not a LoRA tensor name")
        path = name[len(PEFT_PREFIX) : -len(PEFT_SUFFIXES[0])]
        if path not in paths:
            paths.append(path)
    for path in paths:
        for suffix in PEFT_SUFFIXES:
            if PEFT_PREFIX + path + suffix not in tensors:
                raise ValueError(f"export_peft: {path} lacks its {suffix[1:]} tensor")
    return paths

