"""DualEdit: text and visual cross-attention adapters on a frozen VLM, a similarity gate, and a
memory of many edits (see docs/SPEC section 1).

Read these three first:
adapter.py  what it computes: CrossAttentionAdapter (identity at initialisation)
gate.py     when it acts: gate keys, the decision per call (nearest edit, similarity >= tau),
            GateDecision (DualEditor.explain)
editor.py   what an edit stores: DualEditor (apply = one frozen forward whose layer-t / layer-v
            states go to the memory), the user API and the files

Plumbing:
config.py   DualEditConfig (layers, width, heads, tau, gate options, ablations, dtype)
memory.py   EditMemory (states and gate keys of many edits), on the shared editors.memory.EditStore
hooks.py    DualEditHooks (the adapters' layer hooks, per-call context), on editors.hooks.HookSet
files.py    the adapter config saved in the editor folder, strict weight loading
calibrate.py tau chosen on held-out edits (choose_tau; calibrate_adapters for trained adapters)
losses.py   the edited training pass (edit_pass: loss and validation metrics)
train.py    DualEditTrainable (the training loop's view of DualEdit), train_dualedit
method.py   the registry entry (MethodSpec) and the demo's small-model recipe
"""

from dualedit.editors.dualedit.adapter import CrossAttentionAdapter
from dualedit.editors.dualedit.calibrate import calibrate_adapters
from dualedit.editors.dualedit.config import DEFAULT_TAU, DualEditConfig, default_layers
from dualedit.editors.dualedit.gate import GateDecision
from dualedit.editors.dualedit.editor import DualEditor, states_of
from dualedit.editors.dualedit.files import load_adapter_weights, read_adapter_config
from dualedit.editors.dualedit.hooks import (
    CallContext,
    DualEditHooks,
    apply_adapter,
    text_positions,
)
from dualedit.editors.dualedit.memory import EditId, EditInfo, EditMemory, EditStates
from dualedit.editors.dualedit.train import DualEditTrainable, train_dualedit

__all__ = [
    "DEFAULT_TAU",
    "CallContext",
    "CrossAttentionAdapter",
    "DualEditConfig",
    "DualEditHooks",
    "DualEditTrainable",
    "DualEditor",
    "EditId",
    "EditInfo",
    "EditMemory",
    "EditStates",
    "GateDecision",
    "apply_adapter",
    "calibrate_adapters",
    "default_layers",
    "load_adapter_weights",
    "read_adapter_config",
    "states_of",
    "text_positions",
    "train_dualedit",
]
