"""The shared core of the gradient-based weight editors (MEND, KE): editor.py (GradientEditor:
targets, apply the network's update to the weights, restore, files) and train.py (the edited
training pass and the trainer)."""

from dualedit.editors.gradient.editor import GradientEditor
from dualedit.editors.gradient.train import GradientTrainable, gradient_pass, train_gradient_editor

__all__ = ["GradientEditor", "GradientTrainable", "gradient_pass", "train_gradient_editor"]
