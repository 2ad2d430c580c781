"""Proposing a lower threshold (``pairmill calibrate``).

Two ways to choose ``low`` for a given ``high``:

- keep a fraction F of the candidates with similarity <= high (``--keep-fraction``);
- keep as many pairs as another run keeps with its own band (``--match``): the
  paper set CLIP's lower threshold so CLIP and DINOv2 keep about the same number.

Both come down to the K-th largest similarity among the candidates <= high,
found exactly in two streaming passes: a fine histogram to find the bin holding
rank K, then the distinct values of that one bin (with their counts) to pick the
exact float32 value. Memory is bounded by the bin's distinct values, not the run.

Ties: ``low`` is set to the K-th largest value v, so the band keeps every
candidate with v <= s <= high. When several candidates share v, that is more
than K (no band can keep exactly K then); v is the threshold that keeps the
fewest pairs not fewer than K, and `Proposal.kept` reports the exact number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pairmill.errors import ConfigError, InputError
from pairmill.hist import bin_index, histogram_run, similarity_values
from pairmill.inspect_run import Run

# 2**16 bins over [-1, 1]: bins about 3e-5 wide, so the second pass sees ~1/65536 of the rows.
FINE_BINS = 1 << 16


@dataclass(frozen=True)
class Proposal:
    """A proposed band and what it keeps.

    Args:
      run: the run directory.
      encoder: its encoder preset.
      low: the proposed lower threshold (a float32 value, printed shortest).
      high: the upper threshold (the run's unless overridden).
      target: the number of pairs asked for (K).
      kept: candidates with low <= s <= high (>= target; more only through ties).
      candidates: all candidates of the run.
      below_high: candidates with s <= high (the base of --keep-fraction).
      reference: how the target was set ('keep 30% of …' or 'match RUN …').
    """

    run: str
    encoder: str
    low: float
    high: float
    target: int
    kept: int
    candidates: int
    below_high: int
    reference: str

    def to_json(self) -> dict[str, Any]:
        keys = ("low", "high", "kept", "candidates")
        return {key: getattr(self, key) for key in keys}


@dataclass(frozen=True)
class Rank:
    """The K-th largest value of a stream and how many values reach it.

    Args:
      value: the K-th largest value (float32).
      at_least: values >= value (K, or more with ties).
      total: values considered.
    """

    value: np.float32
    at_least: int
    total: int


@dataclass(frozen=True)
class FineHistogram:
    """First pass: counts of the values <= high in `FINE_BINS` bins, and all values seen.

    Args:
      counts: per fine bin, values <= high.
      rows: every value seen (NaN and values above high included).
    """

    counts: np.ndarray
    rows: int

    @property
    def below_high(self) -> int:
        return int(self.counts.sum())


def fine_histogram(values: Callable[[], Iterator[np.ndarray]], high: float) -> FineHistogram:
    """Pass one over the stream."""
    high32 = np.float32(high)
    counts = np.zeros(FINE_BINS, dtype=np.int64)
    rows = 0
    for batch in values():
        rows += len(batch)
        batch = batch[batch <= high32]  # NaN compares false: dropped here
        counts += np.bincount(bin_index(batch, FINE_BINS), minlength=FINE_BINS)
    return FineHistogram(counts, rows)


def kth_largest(
    values: Callable[[], Iterator[np.ndarray]], k: int, high: float, first: FineHistogram
) -> Rank:
    """The k-th largest of the float32 values <= high (NaN ignored): pass two over the stream.

    Args:
      values: called once per pass; yields float32 arrays (the same ones each time).
      k: 1-based rank from the top.
      high: only values <= float32(high) count.
      first: the first pass, `fine_histogram(values, high)`.
    """
    total = first.below_high
    if not 1 <= k <= total:
        raise InputError(f"cannot keep {k:,} pairs: only {total:,} candidates are <= {high:g}")
    # at_or_above[b]: values in bins >= b. The target bin is the highest one reaching rank k.
    at_or_above = np.cumsum(first.counts[::-1])[::-1]
    target = int(np.flatnonzero(at_or_above >= k)[-1])
    above = int(at_or_above[target + 1]) if target + 1 < FINE_BINS else 0
    distinct, multiplicity = _bin_values(values, target, np.float32(high))
    # Walk the bin's distinct values from the top until rank k is reached.
    reached = above + np.cumsum(multiplicity)
    pick = int(np.searchsorted(reached, k))
    return Rank(distinct[pick], int(reached[pick]), total)


def _bin_values(
    values: Callable[[], Iterator[np.ndarray]], target: int, high32: np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of one fine bin (descending) with their multiplicities."""
    found: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for batch in values():
        batch = batch[batch <= high32]
        mine = batch[bin_index(batch, FINE_BINS) == target]
        if len(mine):
            distinct, counts = np.unique(mine, return_counts=True)
            found.append(distinct)
            weights.append(counts)
    # Merge per-batch uniques: ties collapse, so memory is bounded by distinct values.
    distinct, inverse = np.unique(np.concatenate(found), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate(weights)).astype(np.int64)
    return distinct[::-1], counts[::-1]


def shortest_float(value: np.float32) -> float:
    """The shortest decimal that reads back as this float32 (0.3, not 0.30000001192…)."""
    text = np.format_float_positional(np.float32(value), unique=True, trim="-")
    short = float(text)
    return short if np.float32(short) == np.float32(value) else float(value)


def target_for_fraction(fraction: float, below_high: int) -> int:
    """K = round(F * M), half up; at least 1."""
    return max(1, math.floor(fraction * below_high + 0.5))


def _stream(run: Run) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: similarity_values(run)


def propose(run: Run, k: int, high: float, reference: str, first: FineHistogram) -> Proposal:
    """The band [low, high] of run keeping the fewest pairs, but at least k."""
    rank = kth_largest(_stream(run), k, high, first)
    return Proposal(
        run=run.url,
        encoder=run.encoder,
        low=shortest_float(rank.value),
        high=high,
        target=k,
        kept=rank.at_least,
        candidates=first.rows,
        below_high=rank.total,
        reference=reference,
    )


def keep_fraction(run_dir: str, fraction: float, high: float | None = None) -> Proposal:
    """Propose low so the band keeps fraction F of the candidates with s <= high."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--keep-fraction must be in (0, 1], got {fraction}")
    run = Run(run_dir)
    high = run.high if high is None else float(high)
    first = fine_histogram(_stream(run), high)
    if first.below_high == 0:
        raise InputError(f"{run.url} has no candidates with similarity <= {high:g}")
    k = target_for_fraction(fraction, first.below_high)
    reference = f"keep {fraction:g} of the {first.below_high:,} candidates <= {high:g}: {k:,}"
    return propose(run, k, high, reference, first)


def match(run_dir: str, other_dir: str, high: float | None = None) -> Proposal:
    """Propose low so run keeps as many pairs as `other` keeps with its own manifest band."""
    run = Run(run_dir)
    other = histogram_run(Run(other_dir), bins=1)
    high = run.high if high is None else float(high)
    if other.kept == 0:
        raise InputError(f"{other_dir} keeps no pairs with its band: nothing to match")
    reference = (
        f"match {other.run} ({other.encoder}, {other.low:g} <= sim <= {other.high:g}): "
        f"{other.kept:,} pairs"
    )
    return propose(run, other.kept, high, reference, fine_histogram(_stream(run), high))


def format_proposal(p: Proposal) -> str:
    """What ``pairmill calibrate`` prints."""
    share = 100.0 * p.kept / p.candidates if p.candidates else 0.0
    lines = [
        f"run       {p.run} ({p.encoder})",
        f"target    {p.reference}",
        f"proposal  --low {p.low!r} --high {p.high!r}",
        f"keeps     {p.kept:,} of {p.candidates:,} candidates ({share:.1f}%)",
    ]
    if p.kept > p.target:
        lines.append(
            f"ties      {p.kept - p.target:,} more candidates share similarity {p.low!r}: "
            "no band keeps exactly the target"
        )
    return "\n".join(lines)
