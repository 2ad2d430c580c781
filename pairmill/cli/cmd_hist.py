"""`pairmill hist`: the similarity distribution of runs, and how a band splits it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


def hist(
    runs: Annotated[list[str], typer.Argument(help="Run directories (paths or fsspec URLs).")],
    low: Annotated[
        Optional[float], typer.Option(help="Preview this lower threshold (default: the run's).")
    ] = None,
    high: Annotated[
        Optional[float], typer.Option(help="Preview this upper threshold (default: the run's).")
    ] = None,
    bins: Annotated[int, typer.Option(help="Bins over [-1, 1].")] = 40,
    png: Annotated[
        Optional[Path], typer.Option(help="Save a histogram plot (runs overlaid) as PNG.")
    ] = None,
    by_domain: Annotated[
        bool, typer.Option("--by-domain", help="Counts per page domain (top 20).")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
    examples: Annotated[
        Optional[Path],
        typer.Option(help="Save a contact sheet with a few pairs from each similarity range."),
    ] = None,
) -> None:
    """Histogram of candidate similarities: counts below, in and above the band (inclusive)."""
    from pairmill import hist as lib

    if bins < 1:
        raise typer.BadParameter(f"must be at least 1, got {bins}", param_hint="--bins")
    if low is not None and high is not None and low > high:
        raise typer.BadParameter(f"--low {low} is above --high {high}", param_hint="--low")
    if examples is not None and len(runs) > 1:
        raise typer.BadParameter("takes a single run", param_hint="--examples")
    results = [lib.histogram_run(run, low, high, bins, by_domain) for run in runs]
    notes = []
    if png is not None:
        lib.plot_histograms(results, png)
        notes.append(f"wrote {png}")
    if examples is not None:
        lib.write_examples(runs[0], examples, low, high)
        notes.append(f"wrote {examples}")
    if json_out:
        print(json.dumps(lib.results_json(results), indent=2))
        for note in notes:
            print(note, file=sys.stderr)
        return
    print("\n\n".join(lib.format_text(result) for result in results))
    for note in notes:
        print(note)


def register(app) -> None:
    """Add the command to the typer app."""
    app.command(name="hist")(hist)
