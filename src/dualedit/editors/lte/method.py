"""LTE's entry in the method registry: its editor, its trainer and the small-model recipe."""

from __future__ import annotations

from dualedit.editors.lte.editor import LTEditor
from dualedit.editors.lte.train import train_lte
from dualedit.editors.spec import MethodSpec, Recipe
from dualedit.train.settings import TrainSettings

#: The demo's recipe for the 6-layer models of the built-in world, a starting point to tune on
#: the validation edits: a wider LoRA (rank 16 on every attention and feed-forward map: the
#: small models were never taught to read a fact in context, so the LoRA has more to learn than
#: LTE's q/k/v of a 7B chat model) at a higher rate than LTE's 3e-4.
RECIPE = Recipe(
    options={"lora_r": 16, "lora_targets": ("q", "k", "v", "o", "mlp")},
    train=TrainSettings(lr=1e-3, batch_size=8, max_steps=1000, eval_every=250),
)

#: LTE's release for 7B models (LoRA r 8, alpha 16, dropout 0.05 on q/k/v; lr 3e-4).
REAL_OPTIONS = {"lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.05,
                "lora_targets": ("q", "k", "v")}
REAL_TRAIN = TrainSettings(lr=3e-4, batch_size=8)

METHOD = MethodSpec(
    name=LTEditor.name,
    editor=LTEditor,
    summary="LTE: a LoRA trained to follow an updated fact in context; each question reads "
    "its nearest stored edit; trained",
    train=train_lte,
    recipe=RECIPE,
)
