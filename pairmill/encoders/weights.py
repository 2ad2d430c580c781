"""Where encoder weights come from: the Hugging Face cache, a local file, or a seeded random init.

`resolve_weights` runs on the pipeline driver before the graph is built, so it must be fast,
offline and free of side effects: it never downloads, never imports torch and only reads
files (to hash them).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from pairmill.encoders._deps import lazy
from pairmill.encoders.presets import EncoderPreset
from pairmill.errors import WeightsError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
RANDOM = "random"


@dataclass(frozen=True)
class WeightsInfo:
    """Resolved weights for one encoder; recorded in run metadata.

    Args:
      source: "file", "hub" or "random".
      path: the local weights file for file/hub, None for random.
      sha256: hex sha256 of that file, None for random.
      seed: the init seed for random weights, None otherwise.
      semantic: False when embeddings carry no meaning (random weights, the tiny toy model);
        reports must then not claim semantic results.
      description: one line for logs, e.g. "random (seed 0)".
    """

    source: str
    path: str | None
    sha256: str | None
    seed: int | None
    semantic: bool
    description: str

    def to_dict(self) -> dict:
        """Plain dict for run metadata."""
        return asdict(self)


def hub_cache_dir() -> str:
    """The Hugging Face hub cache directory, read from the environment now.

    huggingface_hub freezes HF_HUB_CACHE/HF_HOME when first imported; reading them per call
    (same precedence: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME)
    lets a driver or test point elsewhere after import.
    """
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface",
    )
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(cache))


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so repeated resolves are free."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def random_weights(seed: int) -> WeightsInfo:
    """Seeded random init: reproducible, never semantic."""
    return WeightsInfo(RANDOM, None, None, seed, False, f"random (seed {seed})")


def _local_path(weights: str) -> Path:
    """A user-given weights location as a local path; only file:// URLs are accepted."""
    if "://" in weights:
        url = urlparse(weights)
        if url.scheme != "file" or url.netloc not in ("", "localhost"):
            raise WeightsError(
                f"--weights must be a local path or file:// URL, got {weights!r}; "
                "copy remote weights to the worker image first"
            )
        weights = unquote(url.path)
    return Path(weights).expanduser()


def _from_file(preset: EncoderPreset, weights: str) -> WeightsInfo:
    path = _local_path(weights)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise WeightsError(f"--weights {weights} {what}; pass a weights file or --weights random")
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise WeightsError(
            f"--weights {weights}: unsupported file type; use one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    # Absolute, but symlinks kept: the link's suffix may be the only one (hub-style blobs).
    resolved = os.path.abspath(path)
    return WeightsInfo(
        source="file",
        path=resolved,
        sha256=file_sha256(resolved),
        seed=None,
        semantic=preset.family != "tiny",
        description=f"file: {resolved}",
    )


def _from_hub_cache(preset: EncoderPreset) -> WeightsInfo:
    hub = lazy("huggingface_hub")
    cache = hub_cache_dir()
    for filename in preset.hub_files:
        # Looks only at refs/main and snapshots/ on disk; never touches the network.
        found = hub.try_to_load_from_cache(preset.hub_repo, filename, cache_dir=cache)
        if isinstance(found, str):
            # Keep the snapshot path: it is a symlink into blobs/, whose names have no suffix,
            # and the suffix tells safetensors from pickle.
            return WeightsInfo(
                source="hub",
                path=found,
                sha256=file_sha256(found),
                seed=None,
                semantic=True,
                description=f"hub cache: {preset.hub_repo} ({filename})",
            )
    raise WeightsError(
        f"no weights for {preset.name}: not in the Hugging Face cache ({cache}) and no --weights "
        f"given; on a machine with internet run `hf download {preset.hub_repo} "
        f"{preset.hub_files[0]}` and copy the cache here (or point HF_HUB_CACHE at it), "
        "or pass --weights PATH, or --weights random for offline benchmarks"
    )


def resolve_weights(preset: EncoderPreset, weights: str | None, seed: int = 0) -> WeightsInfo:
    """Decide which weights `preset` will use, without loading them.

    Args:
      preset: the encoder preset.
      weights: None for the Hugging Face cache, "random" for a seeded random init, or a local
        path / file:// URL to a .safetensors, .pt, .pth or .bin file.
      seed: init seed used when the weights are random.

    Raises:
      WeightsError: with a one-line message saying what to do.
    """
    if weights == RANDOM or (weights is None and preset.family == "tiny"):
        # tiny has no pretrained weights: the hub default means its seeded random init.
        return random_weights(seed)
    if weights is None:
        return _from_hub_cache(preset)
    if not weights.strip():
        raise WeightsError("--weights is empty; pass a weights file or --weights random")
    return _from_file(preset, weights)
