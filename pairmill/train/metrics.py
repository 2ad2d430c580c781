"""Sample-quality metrics on feature sets: FID, k-NN precision/recall, copy-rate, alignment.

The paper's few-shot protocol (pick K conditioning images from N test images, generate N/K
samples each, compare the N samples with the N test images) is a matter of choosing the two
feature sets; these functions compare any two. Nearest neighbours are exact, in numpy, in
blocks (faiss is not a dependency), which suits the tens of thousands of points of an eval.
"""

from __future__ import annotations

import numpy as np


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


def knn_radii(x: np.ndarray, k: int = 3, block: int = 1024) -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point of the same set."""
    x = np.asarray(x, np.float64)
    if len(x) <= k:
        raise ValueError(f"need more than k={k} points, got {len(x)}")
    radii = np.empty(len(x))
    for start in range(0, len(x), block):
        d = _sq_distances(x[start : start + block], x)
        # Column k of the sorted row: column 0 is the point itself (distance 0).
        radii[start : start + block] = np.partition(d, k, axis=1)[:, k]
    return radii


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int) -> float:
    """Fraction of `points` inside at least one ball (centres, squared radii)."""
    inside = 0
    for start in range(0, len(points), block):
        d = _sq_distances(points[start : start + block], centres)
        inside += int((d <= radii[None]).any(1).sum())
    return inside / len(points)


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, block: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls.

    Precision: fraction of fake points inside the real manifold (the union of balls around
    real points reaching their k-th neighbour); recall: fraction of real points inside the
    fake manifold.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    precision = _coverage(fake, real, knn_radii(real, k, block), block)
    recall = _coverage(real, fake, knn_radii(fake, k, block), block)
    return precision, recall


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
