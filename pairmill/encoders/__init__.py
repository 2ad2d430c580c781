"""Frozen image encoders: presets, preprocessing, weight resolution and batched embedding.

Importing this package (e.g. to read presets) does not import torch, timm or open_clip;
they load when an encoder is built.
"""

from __future__ import annotations

from pairmill.encoders.model import Encoder, load_encoder, resolve_device
from pairmill.encoders.preprocess import preprocess
from pairmill.encoders.presets import DEFAULT_ENCODER, PRESETS, EncoderPreset, get_preset
from pairmill.encoders.weights import WeightsInfo, hub_cache_dir, resolve_weights

__all__ = [
    "DEFAULT_ENCODER",
    "PRESETS",
    "Encoder",
    "EncoderPreset",
    "WeightsInfo",
    "get_preset",
    "hub_cache_dir",
    "load_encoder",
    "preprocess",
    "resolve_device",
    "resolve_weights",
]
