"""Pairing within one episode: similarity matrix, band filter, deterministic sampling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pairmill.urls import stable_hash


@dataclass(frozen=True)
class Candidate:
    """One unordered pair of images from one episode.

    Args:
      pair_id: stable id of the unordered pair.
      episode_id: the episode.
      cond_image_id: the side with the smaller image id.
      target_image_id: the other side.
      similarity: cosine similarity (float32 dot product of the unit embeddings).
      kept: inside the band, and selected when the episode's pairs are capped.
    """

    pair_id: str
    episode_id: str
    cond_image_id: str
    target_image_id: str
    similarity: float
    kept: bool


def pair_id(episode_id: str, a: str, b: str) -> str:
    """The id of an unordered pair (the same whichever side comes first)."""
    low, high = (a, b) if a <= b else (b, a)
    return stable_hash(episode_id, low, high)


def similarity_matrix(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarities of unit-norm rows, as float32.

    Accumulated in float64 and rounded once, so each value is the correctly
    rounded dot product of the stored float32 embeddings, symmetric, and the
    same whatever BLAS or batch shape computed it.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    return (emb @ emb.T).astype(np.float32)


def pair_episode(
    episode_id: str,
    images: list[tuple[str, np.ndarray]],
    low: float,
    high: float,
    max_pairs: int | None = None,
) -> list[Candidate]:
    """Every candidate pair of an episode with its similarity and kept flag.

    Args:
      episode_id: the episode.
      images: (image_id, unit embedding) for each accepted image of the episode.
      low, high: the band; a pair is in it when low <= similarity <= high.
      max_pairs: keep at most this many in-band pairs, chosen by the smallest
        hash of their pair id (deterministic, independent of arrival order).
    """
    if len(images) < 2:
        return []
    ordered = sorted(images, key=lambda item: item[0])
    ids = [image_id for image_id, _ in ordered]
    sims = similarity_matrix(np.stack([emb for _, emb in ordered]))
    rows, cols = np.triu_indices(len(ids), k=1)
    values = sims[rows, cols]
    in_band = (values >= np.float32(low)) & (values <= np.float32(high))
    pair_ids = [pair_id(episode_id, ids[i], ids[j]) for i, j in zip(rows, cols, strict=False)]
    if max_pairs is not None and int(in_band.sum()) > max_pairs:
        chosen = sorted((pair_ids[k] for k in np.flatnonzero(in_band)), key=_sample_key)
        selected = set(chosen[:max_pairs])
        in_band = np.array([pid in selected for pid in pair_ids])
    return [
        Candidate(pair_ids[k], episode_id, ids[i], ids[j], float(values[k]), bool(in_band[k]))
        for k, (i, j) in enumerate(zip(rows, cols, strict=False))
    ]


def _sample_key(pid: str) -> str:
    # Re-hash so the sample is not simply the pairs with the smallest ids.
    return stable_hash("sample", pid)


def similarity_row(candidate: Candidate) -> dict:
    """The similarities-table row (schema ``similarity_v1``)."""
    return {
        "pair_id": candidate.pair_id,
        "episode_id": candidate.episode_id,
        "cond_image_id": candidate.cond_image_id,
        "target_image_id": candidate.target_image_id,
        "similarity": candidate.similarity,
        "kept": candidate.kept,
    }
