"""LTE, Learning to Edit (Jiang et al., ACL 2024): a LoRA trained so that the model follows an
updated fact written before the question; an edit is the stored fact, read by the questions
nearest it.

lora.py    what is trained: LoRA through forward hooks on the decoder layers' linear maps
           (identity at init, the model's state_dict untouched), PEFT-named tensors, export_peft
editor.py  LTEConfig, the templates, LTEditor (facts, retrieval, the prefixed forward, files)
train.py   LTETrainable (the training loop's view of LTE), train_lte
method.py  the registry entry (MethodSpec) and the demo's small-model recipe
"""

from dualedit.editors.lte.editor import TEMPLATES, FactChoice, LTEConfig, LTEditor
from dualedit.editors.lte.lora import LoRA, LoRAHooks, export_peft, find_targets, layer_children
from dualedit.editors.lte.train import LTETrainable, train_lte

__all__ = [
    "TEMPLATES",
    "FactChoice",
    "LTEConfig",
    "LTETrainable",
    "LTEditor",
    "LoRA",
    "LoRAHooks",
    "export_peft",
    "find_targets",
    "layer_children",
    "train_lte",
]
