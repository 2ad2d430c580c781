"""`pairmill inspect`: a run at a glance, and a contact sheet of its pairs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


def inspect(
    run: Annotated[str, typer.Argument(help="Run directory (path or fsspec URL).")],
    png: Annotated[
        Optional[Path], typer.Option(help="Save a contact sheet of pairs (cond | target).")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Pairs on the contact sheet.")] = 16,
    episode: Annotated[
        Optional[str], typer.Option(help="Only pairs of this episode on the sheet.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Tables, encoder, band, counts and top domains of a run."""
    from pairmill import inspect_run as lib

    if n < 1:
        raise typer.BadParameter(f"must be at least 1, got {n}", param_hint="--n")
    written = []
    summary = lib.inspect(
        run,
        png=str(png) if png else None,
        n=n,
        episode=episode,
        on_png=lambda path, count: written.append(f"wrote {path} ({count} pairs)"),
    )
    if json_out:
        print(json.dumps(summary, indent=2))
        for line in written:
            print(line, file=sys.stderr)
        return
    print(lib.format_summary(summary))
    for line in written:
        print(line)


def register(app) -> None:
    """Add the command to the typer app."""
    app.command(name="inspect")(inspect)
