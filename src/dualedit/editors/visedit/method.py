"""VisEdit's entry in the method registry: its editor, its trainer (DualEdit's training loop
and edited pass, without tau calibration: VisEdit has no gate) and the small-model recipe."""

from __future__ import annotations

from typing import Any

from torch import nn

from dualedit.data.mmedit import MMEditDataset
from dualedit.editors.dualedit.train import train_dualedit
from dualedit.editors.spec import MethodSpec, Recipe
from dualedit.editors.visedit.editor import VisEditConfig, VisEditor
from dualedit.train.settings import TrainResult, TrainSettings

#: The demo's recipe for the 6-layer models of the built-in world: the adapter on layer 1 (where
#: DualEdit's visual adapter sits in its recipe), DualEdit's rate and batch, and a longer budget
#: chosen on the validation edits: at DualEdit's 600 steps the LLaVA E-VQA validation score was
#: still climbing (34.4 at step 300, 60.6 at 600), so VisEdit trains 1500 steps and keeps its
#: validation-best step (docs/results.md).
RECIPE = Recipe(
    options={"visual_layer": 1},
    train=TrainSettings(lr=5e-3, batch_size=8, max_steps=1500, eval_every=300),
)

#: The VisEdit release's training for LLaVA-1.5-7B and BLIP2-OPT-2.7B (configs/vead/*.yaml: lr
#: 1e-4, rel / gen / loc weights 1; its influence-trace loss on the map, weight 0.1, needs the
#: attribution traces of the paper and is not implemented here).
REAL_TRAIN = TrainSettings(lr=1e-4, batch_size=8)


def train(
    model: nn.Module,
    processor: Any,
    train_dataset: MMEditDataset,
    *,
    config: VisEditConfig | dict[str, Any] | None = None,
    **kwargs: Any,
) -> TrainResult:
    """Train the VisEdit adapter with the shared loop and DualEdit's rel + gen + loc losses
    (`train_dualedit` with `VisEditor`; no gate, so no threshold is chosen)."""
    kwargs.pop("calibrate_tau", None)
    return train_dualedit(
        model, processor, train_dataset, config=config, calibrate_tau=False,
        editor_class=VisEditor, **kwargs,
    )


METHOD = MethodSpec(
    name=VisEditor.name,
    editor=VisEditor,
    summary="VisEdit: one visual adapter with an influence map on the image tokens, no gate; "
    "trained",
    train=train,
    recipe=RECIPE,
)
