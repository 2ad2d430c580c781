"""`pairmill sample`: image variations from a training checkpoint, as a PNG grid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def sample(
    ckpt: Annotated[Path, typer.Argument(help="A checkpoint (ckpt-<step>.pt or latest.pt).")],
    cond: Annotated[list[Path], typer.Option(help="Conditioning image file (repeatable).")],
    png: Annotated[Path, typer.Option(help="Where to write the grid PNG.")],
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance weight.")] = 0.5,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
    sampler: Annotated[str, typer.Option(help="ddpm (ancestral) or ddim (deterministic).")] = (
        "ddpm"
    ),
    n: Annotated[int, typer.Option(help="Samples per conditioning image.")] = 8,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    weights: Annotated[
        Optional[str],
        typer.Option(
            help="Encoder weights file, or 'random'. Default: the run's (random runs reload "
            "their seed; others use the hub cache)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda.")] = "auto",
    raw: Annotated[
        bool, typer.Option("--raw", help="Use the raw weights instead of the EMA.")
    ] = False,
) -> None:
    """Write a grid: one row per conditioning image, the image then n variations."""
    from pairmill.train.loop import resolve_train_device
    from pairmill.train.sample import sample_grid

    dev = str(resolve_train_device(device))
    width, height = sample_grid(
        ckpt, cond, png, n, steps, sampler, guidance, seed, weights, dev, use_ema=not raw
    )
    print(f"wrote {png} ({width}x{height}: {len(cond)} rows of 1 + {n} images)")


def register(app) -> None:
    """Add the command to the typer app."""
    app.command(name="sample")(sample)
