"""The `tiny` encoder: a small random timm ViT for tests and demos (~900 images/s at batch 32
on 2 CPU cores). Its embeddings mean nothing; the band in presets.py was measured, not chosen.

timm's default ViT init already spreads cosine similarities between different photos
(it does not collapse to ~0.99), so the init is left as timm makes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pairmill.encoders.presets import EncoderPreset

DEPTH = 4
NUM_HEADS = 4


def build_tiny(preset: EncoderPreset) -> torch.nn.Module:
    """A 64 px, patch-8 ViT with 4 blocks of width 128; output is the CLS token after the
    final norm, the same pooling as the DINOv2 presets. Seed torch before calling."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=preset.image_size,
        patch_size=preset.patch_size,
        embed_dim=preset.embed_dim,
        depth=DEPTH,
        num_heads=NUM_HEADS,
        num_classes=0,
        global_pool="token",
    )
