"""What the CLI prints: the build summary, and checking pass-through Beam flags."""

from __future__ import annotations

import json
import sys
from typing import Any


def split_beam_args(tokens: list[str]) -> tuple[list[str], list[str]]:
    """Split the command's leftover tokens into (input paths, Apache Beam flags).

    typer hands flags it does not know to the variadic INPUT argument; Beam's own
    option parser tells which are Beam flags (with their values) and which are
    inputs. A flag neither knows raises a usage error naming the closest match.
    """
    import difflib

    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    seen: dict[str, type] = {}
    for cls in _all_subclasses(PipelineOptions):
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        try:
            cls._add_argparse_args(parser)
        except Exception:  # a conflicting third-party options class
            continue
    _, leftover = parser.parse_known_args(tokens)
    flags = [token for token in leftover if token.startswith("-")]
    if flags:
        from pairmill.cli.app import build_option_names

        name = flags[0].split("=", 1)[0]
        known = build_option_names() + [
            opt for action in parser._actions for opt in action.option_strings
        ]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise _usage_error(f"no such option {flags[0]}{hint}")
    inputs = [token for token in tokens if token in leftover]
    beam_args = [token for token in tokens if token not in leftover]
    return inputs, beam_args


def _usage_error(message: str):
    from pairmill.cli import _click_exceptions

    return _click_exceptions()[0](message)


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def summary(manifest: dict[str, Any], out: str, as_json: bool = False) -> None:
    """Print the build's funnel as a table (or JSON)."""
    counts = manifest["counts"]
    if as_json:
        print(json.dumps({"out": out, "counts": counts, "timing": manifest["timing"]}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pairmill build -> {out}", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("count", justify="right")
    funnel = counts.get("funnel", {})
    table.add_row("records in", f"{counts['records_in']:,}")
    for reason, n in counts["rejects"].items():
        table.add_row(f"  rejected: {reason}", f"{n:,}")
    for label, key in (
        ("selected (cap, URL dedup)", "selected"),
        ("with bytes (inline, file, HTTP)", "loaded"),
        ("decoded", "decoded"),
    ):
        if key in funnel:
            table.add_row(label, f"{funnel[key]:,}")
    table.add_row("images accepted", f"{counts['images']:,}")
    table.add_row("unique contents embedded", f"{counts['unique_images']:,}")
    table.add_row("episodes (pages)", f"{counts['episodes']:,}")
    if "paired" in funnel:
        table.add_row("images on pages with 2+ images", f"{funnel['paired']:,}")
    table.add_row("candidate pairs", f"{counts['candidate_pairs']:,}")
    low, high = manifest["thresholds"]["low"], manifest["thresholds"]["high"]
    table.add_row(f"kept pairs ({low:g} <= sim <= {high:g})", f"{counts['kept_pairs']:,}")
    if "in_kept_pairs" in funnel:
        table.add_row("images in kept pairs", f"{funnel['in_kept_pairs']:,}")
    timing = manifest["timing"]
    table.add_row("seconds", f"{timing['seconds']:.1f}")
    if timing.get("images_per_second") is not None:
        table.add_row("images/s", f"{timing['images_per_second']:.1f}")
    console = Console(file=sys.stdout, width=100)
    console.print(table)
    if not manifest.get("reconciled", True):
        console.print("[red]counts do not reconcile: records_in != images + rejected[/red]")
    top = counts.get("top_reject_domains") or []
    if top:
        console.print(
            "top domains by rejects: " + ", ".join(f"{domain} ({n:,})" for domain, n in top[:5])
        )
    if manifest.get("from_run"):
        source = manifest["from_run"]
        was = source["thresholds"]
        console.print(
            f"re-filtered from {source['run']} (band was {was['low']:g}..{was['high']:g}): "
            "no decoding, no encoder"
        )
    weights = manifest["encoder"]["weights"]
    if not weights.get("semantic", True):
        console.print(f"note: encoder weights are {weights['description']}: not semantic.")
