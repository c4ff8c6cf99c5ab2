"""SERAC's entry in the method registry: its editor, its trainer and the small-model recipe."""

from __future__ import annotations

from dualedit.editors.serac.editor import SERACEditor
from dualedit.editors.serac.train import train_serac
from dualedit.editors.spec import MethodSpec, Recipe
from dualedit.train.settings import TrainSettings

#: The demo's recipe for the 6-layer models of the built-in world (hidden 128): a starting
#: point, not tuned yet (the classifier on layer 3 = depth // 2, the counterfactual model the
#: whole copied language model; lr 1e-3, 1000 steps, validated every 250).
RECIPE = Recipe(
    options={},
    train=TrainSettings(lr=1e-3, batch_size=8, max_steps=1000, eval_every=250),
)

METHOD = MethodSpec(
    name=SERACEditor.name,
    editor=SERACEditor,
    summary="SERAC: edits in a memory, a scope classifier routes in-scope inputs to a "
    "counterfactual model that reads the edit; trained",
    train=train_serac,
    recipe=RECIPE,
)
