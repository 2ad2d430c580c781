"""Patch tokens beside the global embedding, from one forward pass of the encoder.

The trainer's cross-attention conditions on the encoder's local tokens (the paper found
them better than the CLS embedding alone). Each family exposes them differently:

- timm ViTs (DINOv2, the tiny encoder): ``forward_features`` gives the prefix tokens
  (CLS, registers) and the patch tokens after the final norm; ``forward_head`` pools the
  same tensor into the global feature the plain forward returns.
- open_clip ViTs (CLIP): with ``output_tokens`` set, the visual tower returns
  ``(pooled, tokens)``; the tokens are after ``ln_post``, before the projection, so their
  width is the transformer's (768 for ViT-B), not the embedding's.
- open_clip timm towers (SigLIP): the trunk's ``forward_features`` / ``forward_head``,
  then the tower's head.

Tokens come back as (N, P, W) in the encoder's patch order (row-major over the grid) and
may be average-pooled to a coarser square grid to save space.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def global_and_tokens(model: torch.nn.Module, x: torch.Tensor):
    """(global features (N, D), patch tokens (N, P, W)) of one forward pass of `model`."""
    trunk = getattr(model, "trunk", None)
    if trunk is not None:  # open_clip TimmModel (SigLIP)
        feats = trunk.forward_features(x)
        pooled = model.head(trunk.forward_head(feats))
        return pooled, feats[:, getattr(trunk, "num_prefix_tokens", 0) :]
    if hasattr(model, "output_tokens"):  # open_clip VisionTransformer (CLIP)
        previous = model.output_tokens
        model.output_tokens = True
        try:
            pooled, tokens = model(x)
        finally:
            model.output_tokens = previous
        return pooled, tokens
    feats = model.forward_features(x)  # timm VisionTransformer
    return model.forward_head(feats), feats[:, model.num_prefix_tokens :]


def pool_tokens(tokens: torch.Tensor, grid: int | None) -> torch.Tensor:
    """Average-pool (N, P, W) patch tokens on their square grid to grid x grid.

    None or 0 keeps the native grid. A grid finer than the native one is refused.
    """
    n, count, width = tokens.shape
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"{count} patch tokens do not form a square grid")
    if not grid or grid == side:
        return tokens
    if grid > side:
        raise ValueError(f"--token-grid {grid} is finer than the encoder's {side}x{side} patches")
    import torch.nn.functional as F

    square = tokens.transpose(1, 2).reshape(n, width, side, side)
    pooled = F.adaptive_avg_pool2d(square.float(), grid)
    return pooled.flatten(2).transpose(1, 2)
