"""`pairmill inspect` (being written)."""


def register(app) -> None:
    """Add the command to the typer app."""
