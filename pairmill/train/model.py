"""The denoiser: a small DiT-style transformer in pixel space with global image conditioning.

The paper's model is a "simple diffusion" U-ViT (conv stages at high resolution, transformer
blocks at 32x32 and 16x16, cross-attention to the encoder's local tokens). This is the
compact DiT form of the same idea, sized for a companion trainer: patchify, transformer
blocks with adaLN-Zero modulation, unpatchify. The conditioning image enters the paper's
*global* way: its CLS embedding is normalised, projected by a dense layer and added to the
time embedding, which drives every block's modulation (FiLM). Cross-attention to local
tokens is not implemented: pair shards carry only the global embedding.

Classifier-free guidance: when conditioning is dropped (training) or the unconditional
branch is wanted (sampling), a learned null vector replaces the projected embedding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters.

    Args:
      image_size: side of the square images, in pixels.
      patch: patch side; image_size must be a multiple of it.
      width: transformer width.
      depth: number of transformer blocks.
      heads: attention heads (width must be a multiple).
      cond_dim: dimension of the conditioning embedding (the encoder's).
      mlp_ratio: hidden width of each block's MLP over `width`.
    """

    image_size: int = 32
    patch: int = 4
    width: int = 64
    depth: int = 2
    heads: int = 4
    cond_dim: int = 128
    mlp_ratio: float = 4.0

    def to_dict(self) -> dict:
        return asdict(self)


# Sizes: tiny for tests and CPU; S and B follow DiT-S/B (patch 4 keeps 64 tokens at 32 px
# and 256 at 64 px, where the paper's U-ViT runs its transformer at 32x32 and 16x16).
MODELS: dict[str, dict] = {
    "tiny": {"patch": 4, "width": 64, "depth": 2, "heads": 4},
    "S": {"patch": 4, "width": 384, "depth": 12, "heads": 6},
    "B": {"patch": 4, "width": 768, "depth": 12, "heads": 12},
}


def model_config(size: str, image_size: int, cond_dim: int) -> ModelConfig:
    """The ModelConfig of a registry size for `image_size` and the encoder's `cond_dim`."""
    if size not in MODELS:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(MODELS)}")
    return ModelConfig(image_size=image_size, cond_dim=cond_dim, **MODELS[size])


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of continuous times t in [0, 1] (scaled by 1000 like DDPM's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (grid*grid, dim)."""
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (yy.flatten(), xx.flatten()):
        angles = axis[:, None] * omega[None]
        parts += [torch.sin(angles), torch.cos(angles)]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Transformer block with adaLN-Zero: the conditioning vector sets LayerNorm shift/scale
    and a residual gate, initialised to zero so that every block starts as the identity.

    Args:
      width: token width.
      heads: attention heads.
      mlp_ratio: MLP hidden width over `width`.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self._attention(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class Denoiser(nn.Module):
    """Predicts v from a noisy image, its time and the conditioning image's embedding.

    Args:
      config: the architecture (see ModelConfig and MODELS).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.image_size % config.patch:
            raise ValueError(f"image_size {config.image_size} is not a multiple of the patch")
        if config.width % config.heads:
            raise ValueError(f"width {config.width} is not a multiple of heads {config.heads}")
        self.config = config
        w, p = config.width, config.patch
        self.grid = config.image_size // p
        self.patch_embed = nn.Conv2d(3, w, kernel_size=p, stride=p)
        self.register_buffer("pos", sincos_2d(self.grid, w)[None], persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.cond_proj = nn.Linear(config.cond_dim, w)
        # The "no conditioning" input of classifier-free guidance, learned like any weight.
        self.null_cond = nn.Parameter(torch.zeros(w))
        self.blocks = nn.ModuleList(
            Block(w, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.out = nn.Linear(w, p * p * 3)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight.shape[0] != 6 * self.config.width:
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        conv = self.patch_embed.weight
        nn.init.xavier_uniform_(conv.view(conv.shape[0], -1))
        nn.init.normal_(self.null_cond, std=0.02)
        # Zero output layers: the untrained model predicts v = 0, a stable start.
        for layer in (self.final_ada[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        z: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """v prediction.

        Args:
          z: noisy images (B, 3, S, S).
          t: times in [0, 1], (B,).
          cond: conditioning embeddings (B, cond_dim); re-normalised here.
          drop: bool (B,): use the null embedding instead (classifier-free guidance).
        """
        x = self.patch_embed(z).flatten(2).transpose(1, 2) + self.pos
        c = self.time_mlp(timestep_embedding(t, self.config.width).to(x.dtype))
        # Normalise again: shards hold unit vectors, but a user's embedding may not be.
        g = self.cond_proj(F.normalize(cond.float(), dim=-1).to(x.dtype))
        if drop is not None:
            g = torch.where(drop[:, None], self.null_cond.to(g.dtype).expand_as(g), g)
        c = c + g
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        x = self.out(_modulate(self.final_norm(x), shift, scale))
        return self._unpatchify(x)

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, p, g = x.shape[0], self.config.patch, self.grid
        x = x.view(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, 3, g * p, g * p)


def build_model(config: ModelConfig | dict) -> Denoiser:
    """A Denoiser from a ModelConfig or its dict (as stored in checkpoints)."""
    return Denoiser(config if isinstance(config, ModelConfig) else ModelConfig(**config))
