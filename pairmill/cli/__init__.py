"""The `pairmill` command. Errors become one line on stderr (traceback with PAIRMILL_DEBUG=1).

Exit codes: 0 success, 1 a failed run or missing input, 2 bad flags.
"""

from __future__ import annotations

import os
import sys


class _DropBeamImportNoise:
    """Beam warns about optional GCP client libraries at import; users need not see it."""

    def filter(self, record) -> bool:
        return "apitools not found" not in str(record.msg)


def main(argv: list[str] | None = None) -> None:
    import logging

    logging.getLogger().addFilter(_DropBeamImportNoise())
    usage_error, abort = _click_exceptions()

    from pairmill.cli.app import app
    from pairmill.errors import PairmillError

    debug = os.environ.get("PAIRMILL_DEBUG") == "1"
    try:
        code = app(args=argv, prog_name="pairmill", standalone_mode=False)
    except usage_error as exc:
        where = exc.ctx.command_path if exc.ctx else "pairmill"
        message = " ".join(exc.format_message().split())
        print(f"{where}: error: {message} (see '{where} --help')", file=sys.stderr)
        sys.exit(2)
    except (*abort, KeyboardInterrupt):
        print("pairmill: interrupted", file=sys.stderr)
        sys.exit(130)
    except PairmillError as exc:
        if debug:
            raise
        print(f"pairmill: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:  # a bug or a failure inside the runner: still one line
        if debug:
            raise
        root = _root_cause(exc)
        if isinstance(root, PairmillError):
            print(f"pairmill: error: {_one_line(root)}", file=sys.stderr)
        else:
            print(
                f"pairmill: error: {type(root).__name__}: {_one_line(root)} "
                "(set PAIRMILL_DEBUG=1 for the traceback)",
                file=sys.stderr,
            )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _click_exceptions():
    """The usage-error and abort classes of the click that typer runs on.

    Recent typer versions vendor click as ``typer._click``; older ones use click.
    """
    import typer

    try:
        from typer._click.exceptions import UsageError
    except ImportError:  # pragma: no cover - typer without a vendored click
        from click.exceptions import UsageError
    return UsageError, (typer.Abort,)


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while (exc.__cause__ or exc.__context__) and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__
