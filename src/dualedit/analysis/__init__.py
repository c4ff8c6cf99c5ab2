"""The analyses that choose where and when DualEdit edits (the paper's section 2): attention per
modality, noise sensitivity, layer sweeps, gate separability, and a recommendation drawn from
them. `dualedit analyze <kind>` runs each; every one writes PNG figures and a JSON."""
