"""Sampling from a checkpoint: encode conditioning images, generate variations, write a grid.

A checkpoint whose model cross-attends to patch tokens (``token_dim > 0``) gets the
conditioning images' tokens from the same encoder pass as their embeddings, pooled to the
grid the training shards were built with (the checkpoint's ``encoder.token_grid``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pairmill.errors import ConfigError, InputError
from pairmill.train.diffusion import Schedule, sample
from pairmill.train.loop import load_checkpoint
from pairmill.train.model import Denoiser, build_model


def load_denoiser(ckpt: dict[str, Any], use_ema: bool = True, device: str = "cpu") -> Denoiser:
    """The checkpoint's denoiser (EMA weights by default), in eval mode."""
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["ema" if use_ema else "model"])
    return model.to(device).eval()


def encode_images(
    paths: Sequence[str | Path],
    encoder_info: dict[str, Any] | None,
    weights: str | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """L2-normalised embeddings of image files with the checkpoint's encoder.

    Args:
      paths: image files.
      encoder_info: the checkpoint's ``encoder`` block (from the shards' run manifest).
      weights: overrides the weights: a file, or ``random``. By default a run built with
        random weights reloads them with the run's seed (so embeddings match the shards);
        otherwise the hub cache is used.
    """
    encoder, crops = _encoder_and_crops(paths, encoder_info, weights, device)
    return encoder.embed(crops)


def encode_images_with_tokens(
    paths: Sequence[str | Path],
    encoder_info: dict[str, Any] | None,
    weights: str | None = None,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (N, D), float16 patch tokens (N, T, W)) of image files, the tokens pooled
    to the checkpoint's ``token_grid`` (0: native), as the build stored them.

    Raises:
      ConfigError: the tokens' count differs from the one the model was trained on.
    """
    encoder, crops = _encoder_and_crops(paths, encoder_info, weights, device)
    grid = int((encoder_info or {}).get("token_grid") or 0)
    embeddings, tokens = encoder.embed_with_tokens(crops, grid=grid)
    expected = (encoder_info or {}).get("token_count")
    if expected and tokens.shape[1] != expected:
        raise ConfigError(
            f"the encoder gives {tokens.shape[1]} tokens per image at token grid {grid}; "
            f"the model was trained on {expected}"
        )
    return embeddings, tokens


def _encoder_and_crops(paths, encoder_info, weights, device):
    """The checkpoint's encoder and the files' crops, prepared as the build prepares them."""
    from pairmill.encoders import get_preset, load_encoder, preprocess
    from pairmill.images import DecodeConfig, decode_image
    from pairmill.rejects import Rejection

    if not encoder_info or not encoder_info.get("name"):
        raise ConfigError(
            "the checkpoint does not name its encoder (no run manifest was found at training)"
        )
    preset = get_preset(encoder_info["name"])
    recorded = encoder_info.get("weights") or {}
    seed = recorded.get("seed") or 0
    if weights is None and recorded.get("source") == "random":
        weights = "random"
    encoder = load_encoder(preset, weights, device=device, seed=seed)
    sha = recorded.get("sha256")
    if sha and encoder.weights.sha256 and encoder.weights.sha256 != sha:
        raise ConfigError(
            f"encoder weights {encoder.weights.sha256[:12]} differ from the run's {sha[:12]}"
        )
    # The build's own decode path (EXIF orientation, JPEG draft scale, then the preset's
    # preprocessing), so that an image from the shards gets the embedding stored with it.
    prepare = functools.partial(preprocess, preset=preset)
    config = DecodeConfig(min_side=0, max_aspect=math.inf)
    crops = []
    for path in paths:
        decoded = decode_image(_read(path), config, prepare, prepare_min_side=preset.resize_size)
        if isinstance(decoded, Rejection):
            raise InputError(f"cannot decode {path}: {decoded.reason}: {decoded.detail}")
        crops.append(decoded.pixels)
    return encoder, np.stack(crops)


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


def display_pixels(path: str | Path, image_size: int) -> np.ndarray:
    """An image file prepared as training prepares images (shorter side, center crop)."""
    from pairmill.data import decode_pixels

    return decode_pixels(_read(path), image_size, where=str(path))


def generate(
    model: Denoiser,
    embeddings: np.ndarray | torch.Tensor,
    n: int = 8,
    steps: int = 50,
    sampler: str = "ddpm",
    guidance: float = 0.5,
    seed: int = 0,
    tokens: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """n samples per embedding: uint8 array (K, n, S, S, 3). Same seed, same samples.

    `tokens` (K, T, W): the conditioning images' patch tokens, required by (and only by) a
    model with cross-attention.
    """
    if bool(model.config.token_dim) != (tokens is not None):
        need = "needs" if model.config.token_dim else "takes no"
        raise ConfigError(f"this checkpoint's model {need} patch tokens")
    device = next(model.parameters()).device
    cond = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    cond = cond.repeat_interleave(n, dim=0).to(device)
    if tokens is not None:
        tokens = torch.as_tensor(np.asarray(tokens)).repeat_interleave(n, dim=0).to(device)
    schedule = Schedule(image_size=model.config.image_size)
    gen = torch.Generator().manual_seed(seed)
    x = sample(model, schedule, cond, steps, sampler, guidance, generator=gen, tokens=tokens)
    pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    s = model.config.image_size
    return pixels.permute(0, 2, 3, 1).cpu().numpy().reshape(-1, n, s, s, 3)


def grid(conditions: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """One row per conditioning image: the image, then its samples. (K*S, (n+1)*S, 3)."""
    rows = [np.concatenate([c, *s], axis=1) for c, s in zip(conditions, samples, strict=True)]
    return np.concatenate(rows, axis=0)


def sample_grid(
    ckpt_path: str | Path,
    cond_paths: Sequence[str | Path],
    png: str | Path,
    n: int = 8,
    steps: int = 50,
    sampler: str = "ddpm",
    guidance: float = 0.5,
    seed: int = 0,
    weights: str | None = None,
    device: str = "cpu",
    use_ema: bool = True,
) -> tuple[int, int]:
    """Write the grid PNG of `cond_paths` x n samples; returns its (width, height)."""
    from PIL import Image

    if n < 1 or steps < 1:
        raise ConfigError(f"--n and --steps must be >= 1, got {n} and {steps}")
    if sampler not in ("ddpm", "ddim"):
        raise ConfigError(f"--sampler must be ddpm or ddim, got {sampler!r}")
    ckpt = load_checkpoint(ckpt_path)
    model = load_denoiser(ckpt, use_ema, device)
    tokens = None
    if model.config.token_dim:
        embeddings, tokens = encode_images_with_tokens(
            cond_paths, ckpt.get("encoder"), weights, device
        )
    else:
        embeddings = encode_images(cond_paths, ckpt.get("encoder"), weights, device)
    samples = generate(model, embeddings, n, steps, sampler, guidance, seed, tokens)
    s = model.config.image_size
    conditions = np.stack([display_pixels(p, s) for p in cond_paths])
    image = Image.fromarray(grid(conditions, samples))
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    image.save(png)
    return image.size
