"""Typed errors. The CLI turns each into one line on stderr and exit code 1."""


class PairmillError(Exception):
    """Base class of every error pairmill raises on purpose."""


class ConfigError(PairmillError):
    """A flag or option is invalid; raised before the pipeline graph is built."""


class InputError(PairmillError):
    """The crawl input is missing or unreadable as a whole (not one bad record)."""


class WeightsError(PairmillError):
    """Encoder weights cannot be found or loaded."""


class MissingDependencyError(PairmillError):
    """An optional dependency is not installed; the message says what to install."""


def require(module: str, extra: str):
    """Import an optional dependency lazily, or raise with an install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{module} is not installed: pip install 'pairmill[{extra}]'"
        ) from exc
