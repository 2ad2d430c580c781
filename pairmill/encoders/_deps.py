"""Lazy imports of the heavy encoder dependencies, so reading presets never loads torch."""

from __future__ import annotations

from types import ModuleType

from pairmill.errors import require

# torch, timm, open_clip, safetensors and huggingface_hub are core requirements in setup.cfg,
# so a failed import means a broken install; the hint still repairs it, because pip installs
# the core requirements along with any extra.
EXTRA = "encoders"


def lazy(module: str) -> ModuleType:
    """Import `module`, or raise MissingDependencyError with an install hint."""
    return require(module, EXTRA)
