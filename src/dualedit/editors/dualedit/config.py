"""`DualEditConfig`: where the two adapters sit, how wide they are, and how the gate decides.

Fields left as None are derived from the model by `resolve` (layers from the depth, width from the
hidden size, tau and the gate key from the architecture); a resolved config has every field set and is what gets
saved beside the adapter weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dualedit.editors.dualedit.gate import KIND_PARTS, LEARNED

#: The paper's gate thresholds (DualEdit, COLM 2025) per `config.model_type`.
DEFAULT_TAU: dict[str, float] = {"llava": 0.6, "blip-2": 0.8}
#: Width of the adapters' attention space in the released code (for 2560- and 4096-wide models).
DEFAULT_WIDTH = 1024
GATE_SCOPES: tuple[str, ...] = ("both", "text")
GATE_KEYS: tuple[str, ...] = (*KIND_PARTS, LEARNED)
#: The gate key per `config.model_type` (chosen on the validation edits, see `gate_key`); others
#: get DEFAULT_GATE_KEY.
ARCH_GATE_KEY: dict[str, str] = {"blip-2": "prompt_end_image_groups"}
DEFAULT_GATE_KEY = "prompt_end_image"
TEXT_KEYS: tuple[str, ...] = ("all", "text", "answer")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Fields that shape the adapter weights: they must match when weights are loaded.
ARCHITECTURE_FIELDS: tuple[str, ...] = ("text_layer", "visual_layer", "width", "heads")


@dataclass(frozen=True)
class DualEditConfig:
    """DualEdit settings.

    Attributes:
        text_layer: 0-based decoder layer whose output the text adapter edits and where the gate
            key is read. None: round(0.5 * depth) (16 of 32, the paper's setting).
        visual_layer: 0-based decoder layer whose output the visual adapter edits; must not come
            before `text_layer` (the visual adapter uses the gate decision and the edit chosen at
            the text layer). None: round(0.6 * depth) (19 of 32).
        width: width of the adapters' attention space. None: min(1024, hidden size).
        heads: attention heads; must divide `width`.
        tau: gate threshold on the cosine similarity between an input's key and an edit's key.
            None: the paper's value for the architecture (LLaVA 0.6, BLIP-2 0.8).
        gate: True = inputs below `tau` stay unedited; False = every input takes its nearest edit
            (training, and the "without gate" ablation).
        gate_scope: "both" = the gate covers both adapters; "text" = only the text adapter.
        gate_key: "prompt_end" = the text layer's state at the input's last prompt token (the same
            under teacher forcing and in generation); "last_position" = the state at the last
            non-pad position, as in the released code (under teacher forcing that is the last
            target token, an answer the real query does not have); "prompt_end_image" = the
            last-prompt-token state combined with the mean of the image positions' states (see
            keys.py; the cosine is the mean of the two cosines when both sides have an image):
            on 100 eval edits of the built-in world's LLaVA, the best single threshold separates
            T-Gen/V-Gen inputs from M-Loc, hard M-Loc and T-Loc inputs with accuracy 99.0 at
            layer 1 (prompt_end alone: 96.4, V-Gen passing only 90 %).
            "prompt_end_and_image": the same two parts, but the similarity is the smaller of the
            two cosines (question and image must both match; nearest edit chosen by it).
            "prompt_end_image_groups": like "prompt_end_image" with the image mean replaced by
            the means of 4 contiguous groups of image positions (keys.py).
            "learned": keys from two fitted heads (image, question; `heads.py`), the similarity
            the smaller of their cosines; the heads are fitted on the train split's frozen key
            parts by `dualedit calibrate` / `dualedit train` and saved beside the adapters, and
            tau is their learned threshold.
            None: per architecture (`ARCH_GATE_KEY`, else "prompt_end_image"), as chosen on the
            64 validation edits of the built-in world with the trained layer-0 adapters and tau
            calibrated on the same edits: BLIP-2 "prompt_end_image_groups" (64 edits stored at
            once: V-Gen 87.5, M-Loc 89.1, hard M-Loc 75.0, Avg 95.3, against 87.5 / 87.5 / 67.2 /
            95.0 with "prompt_end_image"; one edit at a time: Avg 98.1 against 97.8); LLaVA
            "prompt_end_image" (Avg 87.8 against 87.2 stored at once, 91.25 both one at a time).
            Training (`train_dualedit`, `dualedit train`) saves "learned" instead when neither
            gate_key nor tau is given (`train.default_gate_key`).
        text_prompt_end: True (default) = the text adapter also edits the input's last prompt
            token (the position whose output predicts the first answer token); False = it stops
            just before it, as in the released code, so the first answer token changes only
            through attention in the layers above the text layer. Measured on the 6-layer LLaVA
            of the built-in world (t=3, v=4, lr 1e-3, 8 edits repeated): True fits them (Rel 100)
            in 25 steps, False reaches Rel 75 after 300. Adapter files saved without this field
            were trained the released way and load as False.
        text_keys: which of the edit sample's positions the text adapter attends to: "all"
            (the released code: image, prompt and target positions), "text" (the non-image
            positions only) or "answer" (the last prompt token and the target tokens); the visual
            adapter still attends to all of them. "text" and "answer" also keep fewer positions
            per edit when the layers differ. Adapter files saved without this field load as
            "all". Default "answer": on the built-in world's LLaVA (t=1, text adapter only, lr
            2e-3) held-out Rel reached 26.6 after 800 steps with "answer" and 12.5 with "text"
            (lr 1e-3); with "all" it stayed near 10.
        use_text, use_visual: which adapters act (ablations); at least one.
        dtype: the adapters' parameter and compute dtype ("float32", "bfloat16", "float16");
            None: the language model's dtype.

    Example:
        >>> DualEditConfig(width=64, heads=4).resolve(32, hidden_size=4096, model_type="llava")
        DualEditConfig(text_layer=16, visual_layer=19, width=64, heads=4, tau=0.6, ...)
    """

    #: Fields that shape the adapter weights (they must match when weights are loaded).
    architecture: ClassVar[tuple[str, ...]] = ARCHITECTURE_FIELDS

    text_layer: int | None = None
    visual_layer: int | None = None
    width: int | None = None
    heads: int = 8
    tau: float | None = None
    gate: bool = True
    gate_scope: str = "both"
    gate_key: str | None = None
    text_prompt_end: bool = True
    text_keys: str = "answer"
    use_text: bool = True
    use_visual: bool = True
    dtype: str | None = None

    def __post_init__(self) -> None:
        for name in ("text_layer", "visual_layer"):
            _check_int(name, getattr(self, name), minimum=0, optional=True)
        _check_int("width", self.width, minimum=1, optional=True)
        _check_int("heads", self.heads, minimum=1, optional=False)
        if self.width is not None and self.width % self.heads:
            raise ValueError(
                f"DualEditConfig: width {self.width} is not divisible by heads {self.heads}"
            )
        if self.tau is not None and (
            isinstance(self.tau, bool)
            or not isinstance(self.tau, (int, float))
            or not -1.0 <= self.tau <= 1.0
        ):
            raise ValueError(f"DualEditConfig: tau must be a number in [-1, 1], got {self.tau!r}")
        for name in ("gate", "text_prompt_end", "use_text", "use_visual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"DualEditConfig: {name} must be a bool, got {getattr(self, name)!r}"
                )
        if self.gate_scope not in GATE_SCOPES:
            raise ValueError(
                f"DualEditConfig: gate_scope must be one of {GATE_SCOPES}, got {self.gate_scope!r}"
            )
        if self.gate_key is not None and self.gate_key not in GATE_KEYS:
            raise ValueError(
                f"DualEditConfig: gate_key must be one of {GATE_KEYS}, got {self.gate_key!r}"
            )
        if self.text_keys not in TEXT_KEYS:
            raise ValueError(
                f"DualEditConfig: text_keys must be one of {TEXT_KEYS}, got {self.text_keys!r}"
            )
        if not (self.use_text or self.use_visual):
            raise ValueError(
                "DualEditConfig: use_text and use_visual are both False: nothing to edit"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(
                f"DualEditConfig: dtype must be one of {sorted(DTYPES)} or None, got {self.dtype!r}"
            )
        if (
            self.use_visual
            and self.text_layer is not None
            and self.visual_layer is not None
            and self.visual_layer < self.text_layer
        ):
            raise ValueError(
                f"DualEditConfig: visual_layer {self.visual_layer} comes before text_layer "
                f"{self.text_layer}; the visual adapter needs the edit and gate decision that are "
                "taken at the text layer"
            )

    @property
    def resolved(self) -> bool:
        """True when no field is left to derive from the model."""
        return None not in (
            self.text_layer, self.visual_layer, self.width, self.tau, self.gate_key, self.dtype
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        """The adapters' dtype as a torch dtype (resolved configs only)."""
        if self.dtype is None:
            raise ValueError("DualEditConfig.dtype is not resolved yet (call resolve)")
        return DTYPES[self.dtype]

    def resolve(
        self,
        depth: int,
        hidden_size: int,
        model_type: str,
        dtype: torch.dtype = torch.float32,
    ) -> DualEditConfig:
        """A copy with every None field derived from the model, checked against its depth.

        Args:
            depth: number of decoder layers.
            hidden_size: width of the decoder layers' output.
            model_type: `config.model_type` ("llava", "blip-2"), for the default tau.
            dtype: the language model's dtype, for the default adapter dtype.

        Raises:
            ValueError: a layer out of range, a depth too small for default layers, an unknown
                architecture without an explicit tau, or a width not divisible by heads.
        """
        text_layer, visual_layer = self.text_layer, self.visual_layer
        if text_layer is None or visual_layer is None:
            default_text, default_visual = default_layers(depth)
            text_layer = default_text if text_layer is None else text_layer
            visual_layer = default_visual if visual_layer is None else visual_layer
        for name, layer in (("text_layer", text_layer), ("visual_layer", visual_layer)):
            if not 0 <= layer < depth:
                raise ValueError(
                    f"DualEditConfig: {name} {layer} out of range for a model with {depth} "
                    f"decoder layers (0..{depth - 1})"
                )
        tau = self.tau
        if tau is None:
            if model_type not in DEFAULT_TAU:
                raise ValueError(
                    f"DualEditConfig: no default tau for model_type {model_type!r}; set tau "
                    f"(defaults exist for {sorted(DEFAULT_TAU)})"
                )
            tau = DEFAULT_TAU[model_type]
        gate_key = self.gate_key
        if gate_key is None:
            gate_key = ARCH_GATE_KEY.get(model_type, DEFAULT_GATE_KEY)
        dtype_name = self.dtype
        if dtype_name is None:
            names = {v: k for k, v in DTYPES.items()}
            if dtype not in names:
                raise ValueError(f"DualEditConfig: unsupported model dtype {dtype}; set dtype")
            dtype_name = names[dtype]
        return dataclasses.replace(
            self,
            text_layer=text_layer,
            visual_layer=visual_layer,
            width=self.width if self.width is not None else min(DEFAULT_WIDTH, hidden_size),
            tau=float(tau),
            gate_key=gate_key,
            dtype=dtype_name,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Sorted, indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "config") -> DualEditConfig:
        """Build from a dict, naming unknown keys (typos are errors, unlike transformers)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown {cls.__name__} field(s) {unknown}")
        return cls(**data)


def default_layers(depth: int) -> tuple[int, int]:
    """(text layer, visual layer) for a decoder of `depth` layers: about 0.5 and 0.6 of the depth,
    distinct, neither the first nor the last layer. 32 layers -> (16, 19) as in the paper.

    Raises:
        ValueError: fewer than 4 layers (no two distinct middle layers).
    """
    if depth < 4:
        raise ValueError(
            f"a model with {depth} decoder layers has no two distinct middle layers for the "
            "default adapter placement; set text_layer and visual_layer"
        )
    text = min(max(int(0.5 * depth + 0.5), 1), depth - 2)
    visual = min(max(int(0.6 * depth + 0.5), 1), depth - 2)
    if visual <= text:
        if text + 1 <= depth - 2:
            visual = text + 1
        else:
            text, visual = depth - 3, depth - 2
    return text, visual


def _check_int(name: str, value: Any, *, minimum: int, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"an int >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"DualEditConfig: {name} must be {expected}, got {value!r}")
