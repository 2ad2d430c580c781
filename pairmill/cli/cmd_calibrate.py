"""`pairmill calibrate`: propose a lower threshold from a target number of kept pairs."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer


def calibrate(
    run: Annotated[str, typer.Argument(help="Run directory (path or fsspec URL).")],
    keep_fraction: Annotated[
        Optional[float],
        typer.Option(help="Keep this fraction (0 < F <= 1) of the candidates <= high."),
    ] = None,
    match: Annotated[
        Optional[str],
        typer.Option(help="Keep as many pairs as this other run keeps with its own band."),
    ] = None,
    high: Annotated[
        Optional[float], typer.Option(help="Upper threshold (default: the run's).")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print {low, high, kept, candidates} as JSON.")
    ] = False,
) -> None:
    """Propose --low for a target number of kept pairs (exact; streams the similarities)."""
    from pairmill import calibrate as lib

    if (keep_fraction is None) == (match is None):
        raise typer.BadParameter("give exactly one of --keep-fraction or --match")
    if keep_fraction is not None:
        if not 0.0 < keep_fraction <= 1.0:
            raise typer.BadParameter(
                f"must be in (0, 1], got {keep_fraction}", param_hint="--keep-fraction"
            )
        proposal = lib.keep_fraction(run, keep_fraction, high)
    else:
        proposal = lib.match(run, match, high)
    if json_out:
        print(json.dumps(proposal.to_json()))
    else:
        print(lib.format_proposal(proposal))


def register(app) -> None:
    """Add the command to the typer app."""
    app.command(name="calibrate")(calibrate)
