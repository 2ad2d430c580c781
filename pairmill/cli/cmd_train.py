"""`pairmill train`: train the companion pixel-space diffusion model on pair shards."""

from __future__ import annotations

import sys
from typing import Annotated

import typer


def train(
    shards: Annotated[
        list[str], typer.Argument(help="Pair shards: run directories, files, globs or URLs.")
    ],
    out: Annotated[str, typer.Option(help="Checkpoint directory; its latest.pt is resumed.")],
    model: Annotated[str, typer.Option(help="Model size: tiny|S|B.")] = "tiny",
    image_size: Annotated[int, typer.Option(help="Training image side (square crop).")] = 32,
    batch_size: Annotated[int, typer.Option(help="Pairs per step.")] = 32,
    steps: Annotated[int, typer.Option(help="Train up to this step.")] = 1000,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 2e-4,
    ema: Annotated[float, typer.Option(help="EMA decay of the weights.")] = 0.9999,
    cond_drop: Annotated[
        float, typer.Option(help="Probability of dropping the conditioning (for guidance).")
    ] = 0.1,
    objective: Annotated[
        str,
        typer.Option(
            help="pairs: generate the other image of a pair; reconstruct: rebuild the "
            "conditioning image (the baseline that collapses to copies)."
        ),
    ] = "pairs",
    device: Annotated[str, typer.Option(help="auto|cpu|cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the init, data order and noise.")] = 0,
    shuffle_buffer: Annotated[int, typer.Option(help="Rows in the shuffle buffer.")] = 1000,
    log_every: Annotated[int, typer.Option(help="Steps between progress lines.")] = 50,
    ckpt_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 1000,
    tokens: Annotated[
        bool,
        typer.Option(
            "--tokens/--no-tokens",
            help="Cross-attend to the shards' patch tokens when they carry them (pair_v2, "
            "build --store-tokens); --no-tokens trains on the global embedding only.",
        ),
    ] = True,
    crop: Annotated[
        str,
        typer.Option(help="random: a seeded random square per image and step; center."),
    ] = "random",
    crop_scale: Annotated[
        float,
        typer.Option(
            help="Random crops' side in [crop-scale, 1] x the shorter side (1: whole shorter "
            "side, random position along the longer one)."
        ),
    ] = 1.0,
    decode_workers: Annotated[
        int,
        typer.Option(
            help="Threads decoding each batch (0: min(8, CPU count)); the next batch is "
            "prepared while the current one trains."
        ),
    ] = 0,
) -> None:
    """Train (or resume) a v-prediction diffusion model conditioned on pair embeddings (and,
    with pair_v2 shards, on patch tokens through cross-attention)."""
    from pairmill.train.loop import TrainConfig
    from pairmill.train.loop import train as run_training

    config = TrainConfig(
        shards=list(shards),
        out=out,
        model=model,
        image_size=image_size,
        batch_size=batch_size,
        steps=steps,
        lr=lr,
        ema=ema,
        cond_drop=cond_drop,
        objective=objective,
        device=device,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        log_every=log_every,
        ckpt_every=ckpt_every,
        tokens=tokens,
        crop=crop,
        crop_scale=crop_scale,
        decode_workers=decode_workers,
    )
    summary = run_training(config, echo=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"trained to step {summary['step']} (loss {summary['loss']:.4f}); checkpoints in {out}")


def register(app) -> None:
    """Add the command to the typer app."""
    app.command(name="train")(train)
