"""`pairmill validate RUN_DIR`: check a run's shards against its manifest.json."""

from __future__ import annotations

from typing import Annotated

import typer

HELP = (
    "Check a finished run against its manifest.json: every shard present with its size, "
    "sha256, row count and schema version; TFRecord record CRCs; pair similarities inside the "
    "run's band and equal to the dot product of the stored unit-norm embeddings; image bytes "
    "matching their sha256 column, and a sample decoded with Pillow; manifest counts that "
    "reconcile. Prints one OK line, or one 'BROKEN <shard>: <what is wrong>' line per broken "
    "shard and exits 1."
)


def register(app) -> None:
    """Add the command to the typer app."""

    @app.command("validate", help=HELP)
    def validate(
        run_dir: Annotated[
            str,
            typer.Argument(
                metavar="RUN_DIR", help="Run directory holding manifest.json (path or fsspec URL)."
            ),
        ],
        json_out: Annotated[
            bool, typer.Option("--json", help="Print the full result as JSON.")
        ] = False,
        sample: Annotated[
            int,
            typer.Option(
                "--sample",
                min=0,
                help="Pair rows per shard whose images are decoded with Pillow (seeded).",
            ),
        ] = 8,
    ) -> None:
        import json

        from pairmill.validate import summary_lines, validate_run

        result = validate_run(run_dir, sample=sample)
        if json_out:
            print(json.dumps(result, indent=2))
        else:
            for line in summary_lines(result):
                print(line)
        if not result["ok"]:
            raise typer.Exit(1)
