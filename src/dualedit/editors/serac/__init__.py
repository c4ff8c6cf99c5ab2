"""SERAC: a memory of edits, a scope classifier and a counterfactual model (Mitchell et al.,
ICML 2022), on a frozen VLM.

scope.py   the scope classifier: the frozen VLM's pooled states at one layer, a trained MLP,
           p = exp(-||f(edit) - f(query)||^2); SERAC's balanced BCE
editor.py  SERACConfig, SERACEditor (the edit store, routing per row, the truncated
           counterfactual copy of the VLM, files), ScopeDecision (SERACEditor.explain)
train.py   SERACTrainable (the training loop's view of SERAC), train_serac
method.py  the registry entry (MethodSpec) and the demo's small-model recipe
"""

from dualedit.editors.serac.editor import (
    TEMPLATES,
    SERACConfig,
    SERACEditor,
    ScopeDecision,
    counterfactual_copy,
)
from dualedit.editors.serac.scope import ScopeClassifier, balanced_bce, squared_distances
from dualedit.editors.serac.train import SERACTrainable, train_serac

__all__ = [
    "TEMPLATES",
    "SERACConfig",
    "SERACEditor",
    "SERACTrainable",
    "ScopeClassifier",
    "ScopeDecision",
    "balanced_bce",
    "counterfactual_copy",
    "squared_distances",
    "train_serac",
]
