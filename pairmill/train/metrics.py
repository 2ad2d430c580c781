"""Sample-quality metrics on feature sets: FID, k-NN precision/recall, copy-rate, alignment.

The paper's few-shot protocol (pick K conditioning images from N test images, generate N/K
samples each, compare the N samples with the N test images) is a matter of choosing the two
feature sets; these functions compare any two.

Nearest neighbours are exact. With faiss installed (the ``eval`` extra) they run on exact
flat indexes; otherwise in numpy, in float64 blocks (``backend`` picks one). faiss computes
in float32, so its answers are only used where float32 cannot change them and the rest is
settled in float64 (see `knn_radii` and `precision_recall`): both backends return the same
radii (to float64 rounding) and the same precision and recall.
"""

from __future__ import annotations

import functools

import numpy as np

BACKENDS = ("auto", "faiss", "numpy")
# Extra neighbours fetched from faiss beyond the k-th, re-ranked in float64, so that float32
# near-ties around the k-th neighbour cannot change which distance is the k-th.
_SPARE_NEIGHBOURS = 8
# Relative float32 error allowed for in faiss's inner products (eps32 is 6e-8; products of
# a few hundred dimensions accumulate more, so be generous: ambiguous points are re-checked).
_FLOAT32_SLACK = 1e-4


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets a (N, D) and b (M, D): Fréchet distance of their Gaussians."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():
        # Singular products (fewer points than dimensions): regularise, as pytorch-fid does.
        offset = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real  # numerical noise can leave tiny imaginary parts
    diff = mu_a - mu_b
    fid = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)
    return float(max(fid, 0.0))


def _sq_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None] - 2 * x @ y.T
    return np.maximum(d, 0.0)


@functools.cache
def _faiss_module():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _use_faiss(backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "numpy":
        return False
    if _faiss_module() is None:
        if backend == "faiss":
            from pairmill.errors import MissingDependencyError

            raise MissingDependencyError("faiss is not installed: pip install 'pairmill[eval]'")
        return False
    return True


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def knn_radii(x: np.ndarray, k: int = 3, block: int = 1024, backend: str = "auto") -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point of the same set.

    With faiss: an exact L2 index (on the centred points, which keeps float32 cancellation
    small) finds k + 8 candidate neighbours per point; their distances are recomputed in
    float64 and the k-th smallest taken.
    """
    x = np.asarray(x, np.float64)
    if len(x) <= k:
        raise ValueError(f"need more than k={k} points, got {len(x)}")
    if _use_faiss(backend):
        return _knn_radii_faiss(x, k, block)
    radii = np.empty(len(x))
    for start in range(0, len(x), block):
        d = _sq_distances(x[start : start + block], x)
        # Column k of the sorted row: column 0 is the point itself (distance 0).
        radii[start : start + block] = np.partition(d, k, axis=1)[:, k]
    return radii


def _knn_radii_faiss(x: np.ndarray, k: int, block: int) -> np.ndarray:
    faiss = _faiss_module()
    x = x - x.mean(0)  # distances are translation invariant; float32 prefers small norms
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(_f32(x))
    want = min(len(x), k + 1 + _SPARE_NEIGHBOURS)
    radii = np.empty(len(x))
    for start in range(0, len(x), block):
        rows = x[start : start + block]
        _, ids = index.search(_f32(rows), want)
        exact = ((x[ids] - rows[:, None]) ** 2).sum(-1)  # float64, (rows, want)
        # Column k of the sorted row: column 0 is the point itself (distance 0).
        radii[start : start + block] = np.partition(exact, k, axis=1)[:, k]
    return radii


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int) -> float:
    """Fraction of `points` inside at least one ball (centres, squared radii)."""
    return _inside(points, centres, radii, block).sum() / len(points)


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int) -> np.ndarray:
    """Per point: inside at least one ball (float64, blockwise over the points)."""
    inside = np.empty(len(points), bool)
    for start in range(0, len(points), block):
        d = _sq_distances(points[start : start + block], centres)
        inside[start : start + block] = (d <= radii[None]).any(1)
    return inside


def _coverage_faiss(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int):
    """`_coverage` as one maximum-inner-product search.

    |p - c|^2 <= r  <=>  <(p, 1), (2c, r - |c|^2)> >= |p|^2, so p is inside some ball iff
    the best augmented centre's inner product reaches |p|^2. Points whose float32 margin is
    within the rounding slack are re-checked exactly in float64.
    """
    faiss = _faiss_module()
    shift = centres.mean(0)
    c, p = centres - shift, points - shift
    c_sq, p_sq = (c * c).sum(1), (p * p).sum(1)
    index = faiss.IndexFlatIP(c.shape[1] + 1)
    index.add(_f32(np.hstack([2 * c, (radii - c_sq)[:, None]])))
    best, _ = index.search(_f32(np.hstack([p, np.ones((len(p), 1))])), 1)
    margin = best[:, 0].astype(np.float64) - p_sq
    scale = p_sq + 2 * np.sqrt(p_sq * c_sq.max()) + c_sq.max() + np.abs(radii).max()
    slack = _FLOAT32_SLACK * scale + 1e-30
    inside = margin > slack
    unsure = np.flatnonzero(np.abs(margin) <= slack)
    if len(unsure):
        inside[unsure] = _inside(p[unsure], c, radii, block)
    return inside.sum() / len(points)


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, block: int = 1024, backend: str = "auto"
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls.

    Precision: fraction of fake points inside the real manifold (the union of balls around
    real points reaching their k-th neighbour); recall: fraction of real points inside the
    fake manifold. `backend`: auto (faiss if installed), faiss or numpy; both give the same
    answer (see the module docstring).
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    coverage = _coverage_faiss if _use_faiss(backend) else _coverage
    precision = coverage(fake, real, knn_radii(real, k, block, backend), block)
    recall = coverage(real, fake, knn_radii(fake, k, block, backend), block)
    return float(precision), float(recall)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def alignment(samples: np.ndarray, conditions: np.ndarray) -> float:
    """Mean cosine similarity of each sample's embedding to its own conditioning image's."""
    return float(_cosine(samples, conditions).mean())


def copy_rate(samples: np.ndarray, conditions: np.ndarray, threshold: float = 0.95) -> float:
    """Fraction of samples whose similarity to their own conditioning image exceeds
    `threshold` (near copies: what standard FID/LPIPS reward and the paper warns about)."""
    return float((_cosine(samples, conditions) > threshold).mean())
