"""The paper's few-shot evaluation of a checkpoint: FID, precision/recall, copy-rate, alignment.

From N test images pick K conditioning images (``shots`` per group), generate about N/K
samples from each (N in all), embed the N test images and the N samples in one feature space
and compare the two sets (`pairmill.train.metrics`). Copy-rate and alignment compare each
sample with its own conditioning image.

Rules, stated once:
  * Groups: a run directory's images are grouped by episode (one page, one group, as the
    paper's "one conditioning image per class"); a folder with sub-folders has one group per
    sub-folder (the ImageFolder layout); a flat folder or a glob is a single group.
  * K = shots x groups (a group smaller than ``shots`` gives all its images). The
    conditioning images stay among the N test images (they are picked from them).
  * Sample counts: N // K each, and one more for the first N mod K conditioning images.
  * Features: the checkpoint's encoder. Test images are first prepared as training prepares
    them (center crop, the model's image size), so that real and generated images are
    compared at the same resolution; conditioning embeddings for generation are taken at
    full resolution, as the shards stored them. A checkpoint with cross-attention gets the
    conditioning images' patch tokens from that same encoder pass (pooled to the checkpoint's
    token grid): run directories' stored tokens are not read, so every test source (run,
    folder, glob) is conditioned the same way.
  * Copy threshold: ``copy_threshold`` if given, else the upper threshold of the training
    corpus's run manifest (a pair above it was a near duplicate), else 0.9.
  * Everything random (the test subset, the conditioning picks, the noise) follows ``seed``.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pairmill.errors import ConfigError, InputError
from pairmill.train import metrics

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_COPY_THRESHOLD = 0.9
K_NEIGHBOURS = 3

# (cond_embeddings (K, D), cond_pixels (K, S, S, 3) uint8, n, guidance, seed)
#   -> uint8 samples (K, n, S, S, 3). Injectable so tests can plug in a fake model.
Generator = Callable[[np.ndarray, np.ndarray, int, float, int], np.ndarray]


@dataclass
class TestSet:
    """Encoded test images with a group label each, in a deterministic order."""

    images: list[bytes]
    groups: list[str]
    names: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)


def inception_space(
    weights: str | os.PathLike | None, device: str = "cpu"
) -> tuple[dict[str, Callable], dict[str, None], str]:
    """The FID Inception feature space when its weights are available locally.

    Returns (extra_features, extra_thresholds, note) for `evaluate`: empty dicts and a note
    saying where to put the weights when none are found.
    """
    from pairmill.train import inception

    path = inception.find_weights(weights)
    if path is None:
        note = (
            f"FID in the encoder's space only: no local Inception weights "
            f"({inception.WEIGHTS_FILE} in $TORCH_HOME/hub/checkpoints, "
            f"${inception.ENV} or --inception-weights)"
        )
        return {}, {}, note
    features = inception.InceptionFeatures(path, device=device)
    return {"inception": features}, {"inception": None}, f"Inception features from {path}"


@dataclass
class EvalConfig:
    """What `evaluate` depends on (besides the checkpoint and the test set)."""

    shots: int = 1
    n_test: int | None = None
    guidance: Sequence[float] = (0.5,)
    steps: int = 50
    sampler: str = "ddim"
    seed: int = 0
    copy_threshold: float | None = None
    weights: str | None = None
    device: str = "cpu"
    use_ema: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """ConfigError on a bad value, before anything is loaded."""
        if self.shots < 1:
            raise ConfigError(f"--shots must be >= 1, got {self.shots}")
        if self.n_test is not None and self.n_test <= K_NEIGHBOURS:
            raise ConfigError(f"--n-test must be > {K_NEIGHBOURS} (k-NN radii), got {self.n_test}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.sampler not in ("ddpm", "ddim"):
            raise ConfigError(f"--sampler must be ddpm or ddim, got {self.sampler!r}")
        if not self.guidance:
            raise ConfigError("give at least one --guidance value")


# ---------------------------------------------------------------------------------------------
# Test sets


def load_test_set(source: str | os.PathLike) -> TestSet:
    """A run directory's images table, a folder of image files, or a glob of them."""
    text = str(source)
    path = Path(text)
    if (path / "manifest.json").is_file() or "://" in text:
        return _run_images(text)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        # One group per sub-folder (class); files directly in the folder form group ".".
        groups = [str(p.parent.relative_to(path)) for p in files]
    else:
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        groups = ["."] * len(files)
    if not files:
        raise InputError(f"no test images found at {text}")
    images = [_read(p) for p in files]
    return TestSet(images, groups, [str(p) for p in files], source=text)


def _run_images(run_dir: str) -> TestSet:
    from pairmill.inspect_run import Run, iter_batches

    run = Run(run_dir)
    rows: list[tuple[str, str, bytes]] = []
    for batch in iter_batches(run, "images", ["image_id", "episode_id", "image"]):
        columns = batch.to_pydict()
        rows += zip(columns["episode_id"], columns["image_id"], columns["image"], strict=True)
    if not rows:
        raise InputError(f"{run_dir}: the run holds no images")
    rows.sort(key=lambda r: (r[0], r[1]))  # shard order need not be stable; ids are
    return TestSet([r[2] for r in rows], [r[0] for r in rows], [r[1] for r in rows], source=run_dir)


def _read(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


def pick_conditions(
    groups: Sequence[str], shots: int, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Indices of the conditioning images (``shots`` per group) and the sample count of each."""
    by_group: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    chosen: list[int] = []
    for group in sorted(by_group):
        members = by_group[group]
        take = min(shots, len(members))
        chosen += sorted(int(i) for i in rng.choice(members, size=take, replace=False))
    n, k = len(groups), len(chosen)
    counts = [n // k + (1 if i < n % k else 0) for i in range(k)]
    return chosen, counts


# ---------------------------------------------------------------------------------------------
# Features


def png_bytes(pixels: np.ndarray) -> bytes:
    """A uint8 (S, S, 3) array as PNG bytes (lossless: the encoder sees exactly the sample)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def embed_bytes(
    images: Sequence[bytes],
    encoder_info: dict | None,
    weights: str | None,
    device: str,
    tokens: bool = False,
):
    """Embed encoded images with the checkpoint's encoder (through `encode_images`, which
    reads files: the build's decode path, so that embeddings match the shards').

    Returns float64 (N, D) embeddings, or with `tokens` (embeddings, float16 (N, T, W) patch
    tokens at the checkpoint's token grid).
    """
    from pairmill.train.sample import encode_images, encode_images_with_tokens

    with tempfile.TemporaryDirectory(prefix="pairmill-eval-") as tmp:
        paths = []
        for i, data in enumerate(images):
            path = Path(tmp) / f"{i:07d}.img"
            path.write_bytes(data)
            paths.append(path)
        if tokens:
            emb, toks = encode_images_with_tokens(paths, encoder_info, weights, device)
            return np.asarray(emb, np.float64), toks
        return np.asarray(encode_images(paths, encoder_info, weights, device), np.float64)


def feature_space(encoder_info: dict | None) -> str:
    """A label for the encoder's embedding space, e.g. ``encoder:tiny (random weights, ...)``."""
    info = encoder_info or {}
    weights = info.get("weights") or {}
    name = info.get("name") or "unknown"
    if weights.get("source") == "random" or weights.get("semantic") is False:
        return f"encoder:{name} (random weights, not semantic)"
    return f"encoder:{name}"


def corpus_high_threshold(ckpt: dict[str, Any]) -> float | None:
    """The upper similarity threshold of the training corpus's run manifest, if one is found."""
    for shard in (ckpt.get("config") or {}).get("shards") or []:
        base = str(shard).rstrip("/")
        for candidate in (base, os.path.dirname(base), os.path.dirname(os.path.dirname(base))):
            manifest = Path(candidate) / "manifest.json"
            if candidate and manifest.is_file():
                try:
                    return float(json.loads(manifest.read_text())["thresholds"]["high"])
                except (KeyError, TypeError, ValueError, OSError):
                    return None
    return None


def set_metrics(
    real: np.ndarray,
    fake: np.ndarray,
    fake_conditions: np.ndarray | None = None,
    threshold: float = DEFAULT_COPY_THRESHOLD,
) -> dict[str, float]:
    """FID and k-NN precision/recall of two feature sets; copy-rate and alignment when each
    fake row's conditioning features are given."""
    precision, recall = metrics.precision_recall(real, fake, k=K_NEIGHBOURS)
    out = {
        "fid": metrics.frechet_distance(real, fake),
        "precision": precision,
        "recall": recall,
    }
    if fake_conditions is not None:
        out["copy_rate"] = metrics.copy_rate(fake, fake_conditions, threshold)
        out["alignment"] = metrics.alignment(fake, fake_conditions)
    return out


# ---------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class EvalResult:
    """One row per guidance value, plus the samples (for grids) and the conditioning picks."""

    rows: list[dict[str, Any]]
    conditions: np.ndarray  # (K, S, S, 3) uint8 at the model's resolution
    samples: dict[float, list[np.ndarray]]  # guidance -> K arrays (count_i, S, S, 3)
    test_pixels: np.ndarray  # (N, S, S, 3) uint8
    cond_index: list[int]


def evaluate(
    ckpt_path: str | os.PathLike,
    test: str | os.PathLike | TestSet,
    config: EvalConfig | None = None,
    generate_fn: Generator | None = None,
    extra_features: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    extra_thresholds: dict[str, float] | None = None,
) -> EvalResult:
    """Few-shot metrics of a checkpoint on a test set, one row per guidance value.

    Args:
      ckpt_path: a training checkpoint.
      test: a run directory, a folder or glob of image files, or a `TestSet`.
      config: shots, N, guidance values, sampler, seed, copy threshold, device.
      generate_fn: replaces the checkpoint's sampler (tests plug in fakes).
      extra_features: more feature spaces, name -> function of uint8 (M, S, S, 3) images to
        (M, D) features; each adds FID/precision/recall (and copy-rate/alignment) rows keyed
        ``<metric>@<name>``.
      extra_thresholds: copy thresholds of those spaces (default: the encoder space's;
        None: no copy-rate or alignment in that space).
    """
    from pairmill.data import decode_pixels
    from pairmill.train.loop import load_checkpoint
    from pairmill.train.sample import generate, load_denoiser

    config = config or EvalConfig()
    config.validate()
    if not Path(ckpt_path).is_file():
        raise InputError(f"no checkpoint at {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path)
    encoder_info = ckpt.get("encoder")
    size = int(ckpt["model_config"]["image_size"])
    tests = test if isinstance(test, TestSet) else load_test_set(test)

    rng = np.random.default_rng(config.seed)
    keep = np.arange(len(tests))
    if config.n_test is not None:
        if config.n_test > len(tests):
            raise ConfigError(f"--n-test {config.n_test} exceeds the {len(tests)} test images")
        keep = np.sort(rng.choice(len(tests), size=config.n_test, replace=False))
    if len(keep) <= K_NEIGHBOURS:
        raise InputError(f"need more than {K_NEIGHBOURS} test images, got {len(keep)}")
    images = [tests.images[i] for i in keep]
    groups = [tests.groups[i] for i in keep]
    cond_index, counts = pick_conditions(groups, config.shots, rng)

    where = [tests.names[i] for i in keep]
    test_pixels = np.stack(
        [decode_pixels(data, size, where=name) for data, name in zip(images, where, strict=True)]
    )
    # Real images at the model's resolution, so real and generated images differ in content,
    # not in sharpness; the generator is conditioned on full-resolution embeddings, as trained.
    real = embed_bytes([png_bytes(p) for p in test_pixels], encoder_info, config.weights, "cpu")
    cond_bytes = [images[i] for i in cond_index]
    cond_tokens = None
    if ckpt["model_config"].get("token_dim"):
        cond_full, cond_tokens = embed_bytes(
            cond_bytes, encoder_info, config.weights, "cpu", tokens=True
        )
    else:
        cond_full = embed_bytes(cond_bytes, encoder_info, config.weights, "cpu")
    cond_pixels = test_pixels[cond_index]
    cond_low = real[cond_index]

    if generate_fn is None:
        model = load_denoiser(ckpt, config.use_ema, config.device)

        def generate_fn(emb, _pixels, n, guidance, seed):
            steps, sampler = config.steps, config.sampler
            return generate(model, emb, n, steps, sampler, guidance, seed, cond_tokens)

    threshold = config.copy_threshold
    if threshold is None:
        threshold = corpus_high_threshold(ckpt) or DEFAULT_COPY_THRESHOLD
    space = feature_space(encoder_info)
    extra_features = extra_features or {}
    extra_real = {name: fn(test_pixels) for name, fn in extra_features.items()}
    extra_cond = {name: extra_real[name][cond_index] for name in extra_features}

    rows, all_samples = [], {}
    for guidance in config.guidance:
        drawn = np.asarray(
            generate_fn(cond_full, cond_pixels, max(counts), float(guidance), config.seed)
        )
        per_cond = [drawn[i, :count] for i, count in enumerate(counts)]
        flat = np.concatenate(per_cond)
        owner = np.repeat(np.arange(len(counts)), counts)
        fake = embed_bytes([png_bytes(p) for p in flat], encoder_info, config.weights, "cpu")
        row: dict[str, Any] = {"guidance": float(guidance)}
        row.update(set_metrics(real, fake, cond_low[owner], threshold))
        row.update(
            feature_space=space,
            n=len(flat),
            k=len(counts),
            shots=config.shots,
            copy_threshold=float(threshold),
        )
        for name, fn in extra_features.items():
            thresholds = extra_thresholds or {}
            cut = thresholds.get(name, threshold)
            # A space whose threshold is None has no copy-rate/alignment (e.g. Inception's,
            # where a cosine cut-off means nothing).
            conds = None if name in thresholds and cut is None else extra_cond[name][owner]
            scores = set_metrics(extra_real[name], fn(flat), conds, cut)
            row.update({f"{metric}@{name}": value for metric, value in scores.items()})
        rows.append(row)
        all_samples[float(guidance)] = per_cond
    return EvalResult(rows, cond_pixels, all_samples, test_pixels, cond_index)


# ---------------------------------------------------------------------------------------------
# Output


def plot_precision_recall(rows: Sequence[dict[str, Any]], png: str | os.PathLike) -> tuple:
    """Precision against recall over guidance (one labelled point per value); returns the
    axis labels written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=120)
    recall = [r["recall"] for r in rows]
    precision = [r["precision"] for r in rows]
    ax.plot(recall, precision, marker="o")
    for r in rows:
        ax.annotate(f"g={r['guidance']:g}", (r["recall"], r["precision"]), fontsize=8)
    ax.set_xlabel("recall (k=3)")
    ax.set_ylabel("precision (k=3)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    space = rows[0].get("feature_space", "") if rows else ""
    ax.set_title(f"few-shot precision-recall over guidance\n{space}", fontsize=8)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    labels = (ax.get_xlabel(), ax.get_ylabel())
    plt.close(fig)
    return labels


def sample_grid_png(result: EvalResult, guidance: float, png: str | os.PathLike, n: int = 8):
    """One row per conditioning image: the image, then up to n of its samples."""
    from PIL import Image

    from pairmill.train.sample import grid

    per_cond = result.samples[float(guidance)]
    n = min(n, min(len(s) for s in per_cond))
    image = Image.fromarray(grid(result.conditions, np.stack([s[:n] for s in per_cond])))
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    image.save(png)
    return image.size


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a plain text table."""
    header = f"{'guidance':>8} {'FID':>10} {'precision':>9} {'recall':>7} {'copy':>6} {'align':>6}"
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['guidance']:>8g} {r['fid']:>10.4g} {r['precision']:>9.3f} {r['recall']:>7.3f} "
            f"{r['copy_rate']:>6.3f} {r['alignment']:>6.3f}"
        )
    for r in rows:
        if "fid@inception" in r:
            lines.append(
                f"{r['guidance']:>8g} {r['fid@inception']:>10.4g} "
                f"{r['precision@inception']:>9.3f} {r['recall@inception']:>7.3f}   (Inception)"
            )
    if rows:
        r = rows[0]
        lines.append(
            f"features: {r['feature_space']}; N={r['n']}, K={r['k']} ({r['shots']}-shot); "
            f"copy threshold {r['copy_threshold']:g}"
        )
    return "\n".join(lines)
