"""`pairmill eval`: the paper's few-shot metrics of a checkpoint on held-out images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def eval_command(
    ckpt: Annotated[Path, typer.Argument(help="A checkpoint (ckpt-<step>.pt or latest.pt).")],
    test: Annotated[
        str,
        typer.Option(
            help="Test images: a run directory (groups = episodes), a folder (groups = "
            "sub-folders) or a glob (one group)."
        ),
    ],
    shots: Annotated[
        int, typer.Option(help="Conditioning images per group (K = shots x groups).")
    ] = 1,
    n_test: Annotated[
        Optional[int], typer.Option(help="Use N test images (seeded subset; default all).")
    ] = None,
    guidance: Annotated[
        Optional[list[float]], typer.Option(help="Guidance weight (repeatable: one row each).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
    sampler: Annotated[str, typer.Option(help="ddpm or ddim.")] = "ddim",
    seed: Annotated[int, typer.Option(help="Seed of the subset, the picks and the noise.")] = 0,
    copy_threshold: Annotated[
        Optional[float],
        typer.Option(help="Copy similarity threshold (default: the corpus's upper, else 0.9)."),
    ] = None,
    png: Annotated[
        Optional[Path], typer.Option(help="Plot precision against recall over guidance.")
    ] = None,
    weights: Annotated[
        Optional[str], typer.Option(help="Encoder weights file, or 'random' (default: the run's).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda (the denoiser).")] = "auto",
    inception_weights: Annotated[
        Optional[Path],
        typer.Option(
            help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth); default: "
            "$PAIRMILL_INCEPTION_WEIGHTS or the torch hub cache. Adds FID/precision/recall "
            "in Inception space when found."
        ),
    ] = None,
    inception: Annotated[
        bool, typer.Option(help="Also score in Inception space when its weights are local.")
    ] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """FID, precision/recall (k=3), copy-rate and alignment: K conditioning images from the N
    test images, about N/K samples each, compared with the N test images."""
    from pairmill.train.evaluate import (
        EvalConfig,
        evaluate,
        format_table,
        inception_space,
        plot_precision_recall,
    )
    from pairmill.train.loop import resolve_train_device

    config = EvalConfig(
        shots=shots,
        n_test=n_test,
        guidance=tuple(guidance or (0.5,)),
        steps=steps,
        sampler=sampler,
        seed=seed,
        copy_threshold=copy_threshold,
        weights=weights,
        device=str(resolve_train_device(device)),
    )
    config.validate()  # bad flags fail before the checkpoint is read
    features, thresholds, note = ({}, {}, "")
    if inception:
        features, thresholds, note = inception_space(inception_weights, config.device)
    result = evaluate(ckpt, test, config, None, features, thresholds)
    if png is not None:
        plot_precision_recall(result.rows, png)
    if json_out:
        print(json.dumps(result.rows, indent=1))
    else:
        print(format_table(result.rows))
        if note:
            print(note)
        if png is not None:
            print(f"wrote {png}")


def register(app) -> None:
    """Add the command to the typer app."""
    app.command(name="eval")(eval_command)
