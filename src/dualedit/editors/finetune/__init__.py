"""The fine-tuning methods: FT-L (a language-model MLP) and FT-V (the vision side), one loop
(core.py)."""

from dualedit.editors.finetune.core import FineTuneEditor, TunedTensors
from dualedit.editors.finetune.ftl import FineTuneConfig, FineTuneLayer
from dualedit.editors.finetune.ftv import FineTuneVision, FineTuneVisionConfig

__all__ = [
    "FineTuneConfig",
    "FineTuneEditor",
    "FineTuneLayer",
    "FineTuneVision",
    "FineTuneVisionConfig",
    "TunedTensors",
]
