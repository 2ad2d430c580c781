"""The denoiser: a small DiT-style transformer in pixel space conditioned on an image.

The paper's model is a "simple diffusion" U-ViT (conv stages at high resolution, transformer
blocks at 32x32 and 16x16, cross-attention to the encoder's local tokens). This is the
compact DiT form of the same idea, sized for a companion trainer: patchify, transformer
blocks with adaLN-Zero modulation, unpatchify. The conditioning image enters two ways:

- *global*: its CLS embedding is normalised, projected by a dense layer and added to the
  time embedding, which drives every block's modulation (FiLM);
- *local* (``token_dim > 0``, pair_v2 shards): its patch tokens are normalised (LayerNorm),
  projected to the model width, given a fixed 2-D sine-cosine position (they come row-major
  over a square grid), and every block attends to them in a cross-attention sub-layer after
  its self-attention. That sub-layer's output projection starts at zero, so an untrained
  token model computes exactly what the global-only model with the same weights does.

Classifier-free guidance: when conditioning is dropped (training) or the unconditional
branch is wanted (sampling), a learned null vector replaces the projected embedding and
another learned vector, broadcast over the token positions, replaces the projected tokens.
"""

from __future__ import annotations

import functools
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
      token_dim: width of the encoder's patch tokens; 0: no tokens, no cross-attention
        (global conditioning only; checkpoints from before tokens load with this default).
    """

    image_size: int = 32
    patch: int = 4
    width: int = 64
    depth: int = 2
    heads: int = 4
    cond_dim: int = 128
    mlp_ratio: float = 4.0
    token_dim: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# Sizes: tiny for tests and CPU; S and B follow DiT-S/B (patch 4 keeps 64 tokens at 32 px
# and 256 at 64 px, where the paper's U-ViT runs its transformer at 32x32 and 16x16).
MODELS: dict[str, dict] = {
    "tiny": {"patch": 4, "width": 64, "depth": 2, "heads": 4},
    "S": {"patch": 4, "width": 384, "depth": 12, "heads": 6},
    "B": {"patch": 4, "width": 768, "depth": 12, "heads": 12},
}


def model_config(size: str, image_size: int, cond_dim: int, token_dim: int = 0) -> ModelConfig:
    """The ModelConfig of a registry size for `image_size` and the encoder's `cond_dim` (and
    its patch tokens' `token_dim`, 0 for global conditioning only)."""
    if size not in MODELS:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(MODELS)}")
    return ModelConfig(
        image_size=image_size, cond_dim=cond_dim, token_dim=token_dim, **MODELS[size]
    )


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


@functools.cache
def _cached_positions(grid: int, dim: int, device: torch.device) -> torch.Tensor:
    return sincos_2d(grid, dim).to(device)


def _token_positions(grid: int, dim: int, device: torch.device, dtype) -> torch.Tensor:
    """The tokens' fixed position embedding (grid*grid, dim), made once per grid and device."""
    return _cached_positions(grid, dim, device).to(dtype)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention of (B, N, W) queries over (B, M, W) keys and values."""
    b, n, w = q.shape
    q, k, v = (a.unflatten(-1, (heads, w // heads)).transpose(1, 2) for a in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)


class CrossAttention(nn.Module):
    """Attention from the image patches to the conditioning tokens, as a residual sub-layer.

    No adaLN modulation (as in PixArt's cross-attention); the output projection is zero at
    init, so the sub-layer adds nothing until it has learned to.

    Args:
      width: width of both the patches and the (projected) tokens.
      heads: attention heads.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(tokens).chunk(2, dim=-1)
        return self.proj(_attend(self.q(self.norm(x)), k, v, self.heads))


class Block(nn.Module):
    """Transformer block with adaLN-Zero: the conditioning vector sets LayerNorm shift/scale
    and a residual gate, initialised to zero so that every block starts as the identity.
    With `cross`, a cross-attention sub-layer to the conditioning tokens follows the
    self-attention (the paper's placement).

    Args:
      width: token width.
      heads: attention heads.
      mlp_ratio: MLP hidden width over `width`.
      cross: add the cross-attention sub-layer.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, cross: bool = False):
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
        self.cross = CrossAttention(width, heads) if cross else None

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self._attention(_modulate(self.norm1(x), shift1, scale1))
        if self.cross is not None:
            x = x + self.cross(x, tokens)
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(_attend(q, k, v, self.heads))


class Denoiser(nn.Module):
    """Predicts v from a noisy image, its time and the conditioning image's embedding (and,
    with token_dim > 0, its patch tokens).

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
        if config.token_dim:
            self.token_norm = nn.LayerNorm(config.token_dim, eps=1e-6)
            self.token_proj = nn.Linear(config.token_dim, w)
            # The "no tokens" input: one learned vector at every token position.
            self.null_tokens = nn.Parameter(torch.zeros(w))
        cross = config.token_dim > 0
        self.blocks = nn.ModuleList(
            Block(w, config.heads, config.mlp_ratio, cross) for _ in range(config.depth)
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
        # Zero output layers: the untrained model predicts v = 0, a stable start; zero
        # cross-attention outputs: the token model starts as the global-only model.
        zeroed = [self.final_ada[1], self.out]
        if self.config.token_dim:
            nn.init.normal_(self.null_tokens, std=0.02)
            zeroed += [block.cross.proj for block in self.blocks]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        z: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        drop: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """v prediction.

        Args:
          z: noisy images (B, 3, S, S).
          t: times in [0, 1], (B,).
          cond: conditioning embeddings (B, cond_dim); re-normalised here.
          drop: bool (B,): use the null embedding (and null tokens) instead (classifier-free
            guidance).
          tokens: the conditioning image's patch tokens (B, T, token_dim), T = a square grid;
            required when the model has cross-attention (token_dim > 0), refused otherwise.
        """
        x = self.patch_embed(z).flatten(2).transpose(1, 2) + self.pos
        c = self.time_mlp(timestep_embedding(t, self.config.width).to(x.dtype))
        # Normalise again: shards hold unit vectors, but a user's embedding may not be.
        g = self.cond_proj(F.normalize(cond.float(), dim=-1).to(x.dtype))
        if drop is not None:
            g = torch.where(drop[:, None], self.null_cond.to(g.dtype).expand_as(g), g)
        c = c + g
        kv = self._tokens(tokens, drop, x.dtype)
        for block in self.blocks:
            x = block(x, c, kv)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        x = self.out(_modulate(self.final_norm(x), shift, scale))
        return self._unpatchify(x)

    def _tokens(
        self, tokens: torch.Tensor | None, drop: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """Projected tokens with their grid positions (the null tokens where dropped)."""
        if not self.config.token_dim:
            if tokens is not None:
                raise ValueError("this model has no cross-attention (token_dim 0): pass no tokens")
            return None
        if tokens is None or tokens.dim() != 3 or tokens.shape[-1] != self.config.token_dim:
            shape = None if tokens is None else tuple(tokens.shape)
            raise ValueError(f"expected tokens (B, T, {self.config.token_dim}), got {shape}")
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"{tokens.shape[1]} tokens do not form a square grid")
        # LayerNorm in float32: stored tokens are float16 and their scale varies by encoder.
        kv = self.token_proj(self.token_norm(tokens.float()).to(dtype))
        kv = kv + _token_positions(side, self.config.width, kv.device, kv.dtype)
        if drop is not None:
            kv = torch.where(drop[:, None, None], self.null_tokens.to(kv.dtype), kv)
        return kv

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, p, g = x.shape[0], self.config.patch, self.grid
        x = x.view(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, 3, g * p, g * p)


def build_model(config: ModelConfig | dict) -> Denoiser:
    """A Denoiser from a ModelConfig or its dict (as stored in checkpoints)."""
    return Denoiser(config if isinstance(config, ModelConfig) else ModelConfig(**config))
