"""VisEdit: one visual edit adapter with an influence map, on DualEdit's machinery.

adapter.py  what it computes: InfluenceAdapter (DualEdit's cross-attention, update scaled by
            InfluenceMap per image position)
editor.py   VisEditConfig (one layer, no text adapter, no gate) and VisEditor (a DualEditor)
method.py   the registry entry, its trainer (DualEdit's loop) and the demo's recipe
"""

from dualedit.editors.visedit.adapter import InfluenceAdapter, InfluenceMap
from dualedit.editors.visedit.editor import VisEditConfig, VisEditor

__all__ = ["InfluenceAdapter", "InfluenceMap", "VisEditConfig", "VisEditor"]
