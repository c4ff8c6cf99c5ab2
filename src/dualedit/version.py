"""The library's version and the versions every saved file and result records (a leaf module:
it imports nothing of dualedit, so any module can use it without importing the package root)."""

from __future__ import annotations

from importlib import metadata

__version__ = "0.1.0"


def dualedit_version() -> str:
    """The installed distribution's version, else this module's (a source checkout)."""
    try:
        return metadata.version("dualedit")
    except metadata.PackageNotFoundError:
        return __version__


def versions() -> dict[str, str]:
    """{"dualedit", "transformers", "torch"}: recorded with every result, editor file, checkpoint
    and pretrained model.

    Example:
        >>> sorted(versions())
        ['dualedit', 'torch', 'transformers']
    """
    import torch
    import transformers

    return {
        "dualedit": dualedit_version(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
