"""dualedit: edit the knowledge of vision-language models.

The DualEdit method (text and visual cross-attention adapters with a similarity gate), the
MMEdit evaluation protocol, a built-in procedurally drawn world and small VLMs of the real
transformers architectures pretrained on it.
"""

__version__ = "0.1.0"
