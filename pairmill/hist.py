"""Similarity histograms of a run's candidate pairs (``pairmill hist``).

Users choose the band [low, high] by looking: at the distribution, at how many
pairs a band keeps, and at example pairs from each similarity range. All of it
streams the similarities table record batch by record batch (only the columns it
needs), so 100M candidates take bounded memory.

A pair is in the band when ``float32(low) <= similarity <= float32(high)``: the
same float32 comparison the pipeline makes, so counts here equal its kept counts
(before any per-episode cap) even for thresholds that are not float32 numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pairmill.errors import ConfigError
from pairmill.inspect_run import (
    BottomK,
    Run,
    fetch_rows,
    iter_batches,
    iter_row_groups,
    page_domains,
)
from pairmill.urls import domain

DEFAULT_BINS = 40
EXAMPLE_BINS = 10
BAND_COLOUR = "#f2b134"  # the shaded band in PNGs (not one of matplotlib's run colours)
TOP_DOMAINS = 20


def bin_edges(bins: int) -> np.ndarray:
    """Edges of `bins` equal bins over [-1, 1] (float64, bins + 1 values)."""
    # One correctly rounded division per edge, so -0.05 is the float -0.05.
    return (2.0 * np.arange(bins + 1, dtype=np.float64) - bins) / bins


def bin_index(values: np.ndarray, bins: int) -> np.ndarray:
    """The bin of each float32 value; values outside [-1, 1] go to the end bins.

    Exact for float32 input, tiny and subnormal values included: bin i starts at
    -1 + 2i/bins, so v is in bin >= i exactly when v * bins >= 2i - bins, i.e.
    floor(v * bins) >= 2i - bins; v * bins is exact in float64 (24 + 29 bits).
    (Adding 1 first would round -1e-30 up to 0 and into the wrong bin.)
    """
    scaled = values.astype(np.float64)
    scaled *= bins  # in place: one float64 temporary per batch
    np.floor(scaled, out=scaled)
    index = scaled.astype(np.int64)
    index += bins
    index >>= 1  # floor division by 2, negative values included
    return np.clip(index, 0, bins - 1, out=index)


def band_overlap(edges: np.ndarray, i: int, low: float, high: float) -> str:
    """'in', 'partial' or 'out': how bin i's interior lies against the band.

    A bin that only touches the band at one edge (e.g. [0.9, 0.95) for high 0.9)
    counts as 'out': it holds at most the values equal to the threshold.
    """
    lo, hi = edges[i], edges[i + 1]
    if lo >= low and hi <= high:
        return "in"
    return "partial" if hi > low and lo < high else "out"


def band32(low: float, high: float) -> tuple[np.float32, np.float32]:
    """The band as the pipeline compares it: thresholds rounded to float32."""
    return np.float32(low), np.float32(high)


class BandHistogram:
    """Streaming counts below / in / above a band, and a histogram over [-1, 1].

    Args:
      low: lower threshold (inclusive).
      high: upper threshold (inclusive).
      bins: number of equal bins over [-1, 1].
    """

    def __init__(self, low: float, high: float, bins: int = DEFAULT_BINS):
        self.low, self.high, self.bins = low, high, bins
        self._low32, self._high32 = band32(low, high)
        self.counts = np.zeros(bins, dtype=np.int64)
        self.below = self.kept = self.above = self.nan = 0

    def add(self, values: np.ndarray) -> None:
        """Count one batch of float32 similarities."""
        if len(values) == 0:
            return
        if np.isnan(values.min()):  # min() propagates NaN: one cheap check per batch
            finite = ~np.isnan(values)
            self.nan += int(len(values) - finite.sum())
            values = values[finite]
        below = int(np.count_nonzero(values < self._low32))
        above = int(np.count_nonzero(values > self._high32))
        self.below += below
        self.above += above
        self.kept += len(values) - below - above
        self.counts += np.bincount(bin_index(values, self.bins), minlength=self.bins)

    def categories(self, values: np.ndarray) -> np.ndarray:
        """0 below, 1 in the band, 2 above, 3 NaN, per value."""
        category = np.ones(len(values), dtype=np.int64)
        category[values < self._low32] = 0
        category[values > self._high32] = 2
        category[np.isnan(values)] = 3
        return category


@dataclass
class DomainCounts:
    """Candidates of one page domain by band position.

    Args:
      domain: the page's host without ``www.``.
      below: candidates below the band.
      kept: candidates in the band.
      above: candidates above the band.
    """

    domain: str
    below: int = 0
    kept: int = 0
    above: int = 0

    @property
    def candidates(self) -> int:
        return self.below + self.kept + self.above

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "candidates": self.candidates,
            "below": self.below,
            "kept": self.kept,
            "above": self.above,
        }


@dataclass
class RunHistogram:
    """The similarity distribution of one run under one band.

    Args:
      run: the run directory.
      encoder: encoder preset name.
      weights: description of the encoder weights.
      semantic: False for random weights.
      low, high: the band.
      below, kept, above: candidates below, in and above the band.
      nan: candidates whose similarity is NaN (counted in none of the three).
      edges: bin edges over [-1, 1].
      counts: candidates per bin.
      domains: per-domain counts (top domains by candidates), with --by-domain.
    """

    run: str
    encoder: str
    weights: str
    semantic: bool
    low: float
    high: float
    below: int
    kept: int
    above: int
    nan: int
    edges: np.ndarray
    counts: np.ndarray
    domains: list[DomainCounts] | None = field(default=None)

    @property
    def candidates(self) -> int:
        return self.below + self.kept + self.above + self.nan

    def populated(self) -> tuple[int, int]:
        """First and last bin holding any candidate ((0, -1) when none does)."""
        nonzero = np.flatnonzero(self.counts)
        return (int(nonzero[0]), int(nonzero[-1])) if len(nonzero) else (0, -1)

    def band_overlap(self, i: int) -> str:
        return band_overlap(self.edges, i, self.low, self.high)

    def to_json(self) -> dict[str, Any]:
        out = {
            "run": self.run,
            "encoder": self.encoder,
            "candidates": self.candidates,
            "below": self.below,
            "kept": self.kept,
            "above": self.above,
            "low": self.low,
            "high": self.high,
            "bins": [
                {"lo": float(self.edges[i]), "hi": float(self.edges[i + 1]), "count": int(c)}
                for i, c in enumerate(self.counts)
            ],
        }
        if self.nan:
            out["nan"] = self.nan
        if self.domains is not None:
            out["domains"] = [d.to_json() for d in self.domains]
        return out


def similarity_values(run: Run) -> Iterator[np.ndarray]:
    """Stream a run's candidate similarities as float32 arrays, one record batch at a time."""
    for batch in iter_batches(run, "similarities", ["similarity"]):
        yield batch.column(0).to_numpy(zero_copy_only=False)


def resolve_band(run: Run, low: float | None, high: float | None) -> tuple[float, float]:
    """The band to count: the run's manifest thresholds unless overridden."""
    low = run.low if low is None else float(low)
    high = run.high if high is None else float(high)
    if low > high:
        raise ConfigError(f"--low {low:g} is above --high {high:g} (run {run.url})")
    return low, high


def histogram_run(
    run: Run | str,
    low: float | None = None,
    high: float | None = None,
    bins: int = DEFAULT_BINS,
    by_domain: bool = False,
) -> RunHistogram:
    """Count a run's candidates against a band (default: the run's) in one streaming pass."""
    run = run if isinstance(run, Run) else Run(run)
    low, high = resolve_band(run, low, high)
    acc = BandHistogram(low, high, bins)
    domains = None
    if by_domain:
        domains = _count_by_domain(run, acc)
    else:
        for values in similarity_values(run):
            acc.add(values)
    return RunHistogram(
        run=run.url,
        encoder=run.encoder,
        weights=run.weights.get("description", ""),
        semantic=run.semantic,
        low=low,
        high=high,
        below=acc.below,
        kept=acc.kept,
        above=acc.above,
        nan=acc.nan,
        edges=bin_edges(bins),
        counts=acc.counts,
        domains=domains,
    )


# --------------------------------------------------------------------------- by domain


def episode_domains(run: Run) -> tuple[Any, np.ndarray, list[str]]:
    """The episode -> page domain join table, from the images table.

    Returns (episode ids as a pyarrow array, domain code per episode, domain names).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = []
    for _, _, table in iter_row_groups(run, "images", ["episode_id", "page_url"]):
        # One row per episode of the row group, its domain cut out in C++.
        rows = table.group_by("episode_id", use_threads=False).aggregate([("page_url", "min")])
        names = page_domains(rows.column("page_url_min").combine_chunks())
        parts.append(pa.table({"episode_id": rows.column("episode_id"), "domain": names}))
    if not parts:
        return pa.array([], pa.string()), np.zeros(0, np.int64), []
    joined = pa.concat_tables(parts).group_by("episode_id", use_threads=False)
    joined = joined.aggregate([("domain", "min")])
    encoded = pc.dictionary_encode(joined.column("domain_min").combine_chunks())
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return joined.column("episode_id").combine_chunks(), codes, encoded.dictionary.to_pylist()


def _count_by_domain(run: Run, acc: BandHistogram) -> list[DomainCounts]:
    """Fill `acc` and count candidates per domain: each row group joined on episode id."""
    import pyarrow.compute as pc

    episodes, codes, names = episode_domains(run)
    names = [*names, "(unknown)"]  # episodes missing from the images table
    codes = np.append(codes, len(names) - 1)
    totals = np.zeros(len(names) * 4, dtype=np.int64)
    for _, _, table in iter_row_groups(run, "similarities", ["similarity", "episode_id"]):
        values = table.column("similarity").to_numpy()
        acc.add(values)
        # The join runs in C++ (a hash lookup per row); Python never sees an episode id.
        # Not found (null) -> -1 -> the "(unknown)" code appended last.
        where = pc.fill_null(pc.index_in(table.column("episode_id"), value_set=episodes), -1)
        domain_of_row = codes[where.to_numpy()]
        totals += np.bincount(domain_of_row * 4 + acc.categories(values), minlength=len(totals))
    per_domain = totals.reshape(-1, 4)
    result = [
        DomainCounts(name or "(none)", int(t[0]), int(t[1]), int(t[2]))
        for name, t in zip(names, per_domain, strict=True)
        if t[:3].sum()
    ]
    result.sort(key=lambda d: (-d.candidates, d.domain))
    return result[:TOP_DOMAINS]


# --------------------------------------------------------------------------- text


def _edge_decimals(edges: np.ndarray) -> int:
    """The fewest decimals (at least 2) that print every edge exactly."""
    for digits in range(2, 7):
        if np.allclose(np.round(edges, digits), edges, rtol=0, atol=1e-12):
            return digits
    return 7


def format_text(result: RunHistogram, width: int = 48) -> str:
    """A terminal histogram: one line per populated bin, band bins drawn differently."""
    lines = [f"run      {result.run}"]
    lines.append(f"encoder  {result.encoder}  weights: {result.weights or '?'}")
    if not result.semantic:
        lines.append("warning  random weights are not semantic: these similarities are noise")
    lines.append(f"band     {result.low:g} <= similarity <= {result.high:g}")
    lines.append("")
    first, last = result.populated()
    top = max(1, int(result.counts.max()) if len(result.counts) else 1)
    digits = _edge_decimals(result.edges)
    marks = {"in": ("┃", "█"), "partial": ("╏", "▒"), "out": (" ", "░")}
    for i in range(first, last + 1):
        count = int(result.counts[i])
        mark, char = marks[result.band_overlap(i)]
        length = math.ceil(width * count / top) if count else 0
        lo, hi = result.edges[i], result.edges[i + 1]
        lines.append(
            f"{lo:+.{digits}f} {hi:+.{digits}f} {mark} {char * length:<{width}} {count:>12,}"
        )
    if last < first:
        lines.append("(no candidates)")
    lines.append("")
    lines.append("█ in band   ▒ bin straddles a band edge   ░ outside the band")
    lines.append(_counts_line(result))
    if result.domains is not None:
        lines.append("")
        lines.append(format_domains(result.domains))
    return "\n".join(lines)


def _share(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _counts_line(r: RunHistogram) -> str:
    line = (
        f"candidates {r.candidates:,}: below {r.below:,} ({_share(r.below, r.candidates)}), "
        f"kept {r.kept:,} ({_share(r.kept, r.candidates)}), "
        f"above {r.above:,} ({_share(r.above, r.candidates)})"
    )
    return line + (f", NaN {r.nan:,}" if r.nan else "")


def format_domains(domains: Sequence[DomainCounts]) -> str:
    """Per-domain counts as an aligned table."""
    lines = [f"{'domain':<32}{'candidates':>12}{'below':>10}{'kept':>10}{'above':>10}"]
    for d in domains:
        lines.append(
            f"{d.domain[:32]:<32}{d.candidates:>12,}{d.below:>10,}{d.kept:>10,}{d.above:>10,}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- PNG


def _label(r: RunHistogram) -> str:
    name = r.run.rstrip("/").rsplit("/", 1)[-1]
    random = "" if r.semantic else ", random weights"
    return f"{r.encoder} ({name}{random}): {r.candidates:,} candidates, {r.kept:,} kept"


def _x_range(results: Sequence[RunHistogram]) -> tuple[float, float]:
    """The populated bins of all runs, widened to show the bands' edges."""
    spans = [(r.edges[a], r.edges[b + 1]) for r in results for a, b in [r.populated()] if b >= a]
    lo = min([s[0] for s in spans] + [r.low for r in results])
    hi = max([s[1] for s in spans] + [r.high for r in results])
    pad = 0.02 * (hi - lo or 1.0)
    return max(-1.0, lo) - pad, min(1.0, hi) + pad


def plot_histograms(results: Sequence[RunHistogram], path=None):
    """Overlay the runs' histograms (densities when their counts differ), band shaded.

    Returns the matplotlib Figure (Agg canvas, no pyplot state); saves it as PNG
    when `path` is given, at the figure's dpi so data coordinates map to pixels
    through ``ax.transData``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.09, 0.3, 0.88, 0.6))
    density = len({r.candidates for r in results}) > 1
    _shade_bands(ax, results)
    top = 0.0
    for i, r in enumerate(results):
        widths = np.diff(r.edges)
        total = max(1, r.candidates)
        heights = r.counts / (total * widths) if density else r.counts.astype(float)
        top = max(top, float(heights.max()) if len(heights) else 0.0)
        ax.stairs(heights, r.edges, color=f"C{i}", linewidth=1.8, label=_label(r))
    ax.set_xlim(*_x_range(results))
    ax.set_ylim(0, (top or 1.0) * 1.15)  # headroom: the band stays visible above the bars
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density" if density else "candidate pairs per bin")
    encoders = " vs ".join(dict.fromkeys(r.encoder for r in results))
    if len(results) == 1:
        r = results[0]
        ax.set_title(f"{encoders}: {r.candidates:,} candidates, {r.kept:,} kept")
    else:
        ax.set_title(f"similarities: {encoders}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
    if path is not None:
        fig.savefig(path, dpi=fig.dpi, format="png")
    return fig


def _shade_bands(ax, results: Sequence[RunHistogram]) -> None:
    bands = {(r.low, r.high) for r in results}
    if len(bands) == 1:
        low, high = bands.pop()
        ax.axvspan(low, high, color=BAND_COLOUR, alpha=0.3, lw=0, zorder=0, label=_band(low, high))
        return
    for i, r in enumerate(results):  # different bands: each in its run's colour
        ax.axvspan(r.low, r.high, color=f"C{i}", alpha=0.12, lw=0, zorder=0)
        ax.axvline(r.low, color=f"C{i}", ls="--", lw=1)
        ax.axvline(r.high, color=f"C{i}", ls="--", lw=1, label=_band(r.low, r.high))


def _band(low: float, high: float) -> str:
    return f"band {low:g} <= sim <= {high:g}"


# --------------------------------------------------------------------------- examples

EXAMPLE_COLUMNS = ["pair_id", "episode_id", "cond_image_id", "target_image_id", "similarity"]


@dataclass
class ExampleBin:
    """Sampled pairs of one similarity bin.

    Args:
      lo, hi: the bin's edges.
      count: candidates in the bin.
      band: 'in', 'partial' or 'out' against the band.
      pairs: the sampled similarity rows, each with ``cond_image``, ``target_image``
        and ``page_url`` added from the images table.
    """

    lo: float
    hi: float
    count: int
    band: str
    pairs: list[dict]


def sample_examples(
    run: Run | str,
    low: float | None = None,
    high: float | None = None,
    bins: int = EXAMPLE_BINS,
    per_bin: int = 3,
    seed: int = 0,
) -> list[ExampleBin]:
    """A few pairs from every populated bin, sampled deterministically while streaming.

    Only the sampled images' bytes are then read from the images table.
    """
    run = run if isinstance(run, Run) else Run(run)
    low, high = resolve_band(run, low, high)
    sampler = BottomK(bins, per_bin, seed)
    acc = BandHistogram(low, high, bins)
    for batch in iter_batches(run, "similarities", EXAMPLE_COLUMNS):
        values = batch.column("similarity").to_numpy(zero_copy_only=False)
        acc.add(values)
        group = bin_index(np.nan_to_num(values, nan=-2.0), bins)
        group[np.isnan(values)] = -1
        sampler.offer(group, batch)
    chosen = [sampler.rows(i) for i in range(bins)]
    ids = {row[side] for rows in chosen for row in rows for side in _SIDES}
    images = fetch_rows(run, "images", "image_id", ids, ("image", "page_url"))
    edges = bin_edges(bins)
    result = []
    for i, rows in enumerate(chosen):
        if acc.counts[i]:
            pairs = [_with_images(row, images) for row in sorted(rows, key=_by_similarity)]
            where = band_overlap(edges, i, low, high)
            lo, hi = float(edges[i]), float(edges[i + 1])
            result.append(ExampleBin(lo, hi, int(acc.counts[i]), where, pairs))
    return result


_SIDES = ("cond_image_id", "target_image_id")


def _by_similarity(row: dict) -> tuple[float, str]:
    return row["similarity"], row["pair_id"]


def _with_images(row: dict, images: dict[str, dict]) -> dict:
    cond = images.get(row["cond_image_id"], {})
    target = images.get(row["target_image_id"], {})
    return {
        **row,
        "cond_image": cond.get("image"),
        "target_image": target.get("image"),
        "page_url": cond.get("page_url") or target.get("page_url") or "",
    }


def examples_sheet(run: Run | str, examples: Sequence[ExampleBin], thumb: int = 112):
    """The contact sheet of sampled pairs, one labelled row per bin: (image, layout)."""
    from pairmill import contact

    run = run if isinstance(run, Run) else Run(run)
    band_words = {"in": "in band", "partial": "band edge", "out": "outside band"}
    rows = []
    for b in examples:
        noun = "pair" if b.count == 1 else "pairs"
        label = f"{b.lo:+.2f} … {b.hi:+.2f}\n{b.count:,} {noun}\n{band_words[b.band]}"
        cells = [
            contact.PairCell(
                p["cond_image"],
                p["target_image"],
                f"sim {p['similarity']:.3f}  {domain(p['page_url']) or '?'}",
            )
            for p in b.pairs
        ]
        rows.append((label, cells))
    title = f"{run.url} · {run.encoder} · examples per similarity bin"
    options = {"thumb": thumb, "title": title, "label_width": 120}
    return contact.pair_sheet(rows, **options), contact.sheet_layout(rows, **options)


def write_examples(
    run: Run | str, path, low: float | None = None, high: float | None = None, **kwargs
) -> list[ExampleBin]:
    """Sample examples per bin and save their contact sheet as PNG."""
    from pairmill import contact

    run = run if isinstance(run, Run) else Run(run)
    examples = sample_examples(run, low, high, **kwargs)
    sheet, _ = examples_sheet(run, examples)
    contact.save_png(sheet, path)
    return examples


def results_json(results: Sequence[RunHistogram]) -> Any:
    """The JSON value ``pairmill hist --json`` prints: one object, or a list for several runs."""
    items = [r.to_json() for r in results]
    return items[0] if len(items) == 1 else items
