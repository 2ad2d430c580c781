"""Reading a run back, and the summary and contact sheet of ``pairmill inspect``.

Everything here streams: tables are read shard by shard and row group by row
group, light columns first; image bytes are read only for the few rows a sheet
shows, and only from the row groups that hold them.
"""

from __future__ import annotations

import heapq
import importlib.util
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pairmill.errors import InputError, MissingDependencyError
from pairmill.manifest import TABLES, load_manifest
from pairmill.urls import domain

# Rows per record batch: per-batch temporaries stay around a MB, far below a row group.
BATCH_ROWS = 1 << 16
# Rows gathered per batch when a table can only be read row by row (TFRecord pairs).
ROW_CHUNK = 512
PAIR_LIGHT_COLUMNS = (
    "pair_id",
    "episode_id",
    "page_url",
    "cond_image_id",
    "target_image_id",
    "similarity",
)


# scheme://[userinfo@]host — host is a bracketed IPv6 literal or runs to the port/path.
_HOST_PATTERN = (
    r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^@/?#]*@)?"
    r"(?:\[(?P<v6>[^\]/?#]*)\]|(?P<host>[^:/?#\[\]]*))"
)


def page_domains(urls) -> list[str]:
    """`pairmill.urls.domain` of each URL of a pyarrow string array, vectorised.

    The host is cut out with one regex in C++ (per-episode Python URL parsing
    dominated --by-domain); URLs the regex does not read fall back to `domain`.
    """
    import pyarrow.compute as pc

    parts = pc.extract_regex(urls, _HOST_PATTERN)
    v6, host = parts.field("v6"), parts.field("host")
    host = pc.if_else(pc.equal(v6, ""), host, v6)
    host = pc.replace_substring_regex(pc.utf8_lower(host), r"^www\.", "")
    found = host.to_pylist()
    if any(h is None for h in found):
        raw = urls.to_pylist()
        found = [h if h is not None else domain(u or "") for h, u in zip(found, raw, strict=True)]
    return found


class Run:
    """A run directory and its manifest.

    Args:
      url: the run directory (local path or fsspec URL); InputError if it holds no run.
    """

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.manifest = load_manifest(self.url)

    @property
    def encoder(self) -> str:
        return self.manifest["encoder"]["name"]

    @property
    def weights(self) -> dict[str, Any]:
        return self.manifest["encoder"].get("weights", {})

    @property
    def semantic(self) -> bool:
        return bool(self.weights.get("semantic", True))

    @property
    def low(self) -> float:
        return float(self.manifest["thresholds"]["low"])

    @property
    def high(self) -> float:
        return float(self.manifest["thresholds"]["high"])

    def table(self, name: str) -> dict[str, Any]:
        try:
            return self.manifest["tables"][name]
        except KeyError:
            raise InputError(f"{self.url}: the manifest lists no {name} table") from None

    def shard_urls(self, table: str) -> list[str]:
        """The table's shards, in manifest order (sorted by path: deterministic)."""
        return [f"{self.url}/{shard['path']}" for shard in self.table(table)["shards"]]

    def format(self, table: str) -> str:
        return self.table(table).get("format", "parquet")


def open_parquet(url: str):
    """A ``pyarrow.parquet.ParquetFile`` for a shard (native reads for local paths)."""
    import fsspec
    import pyarrow.parquet as pq
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(url)
    try:
        if isinstance(fs, LocalFileSystem):
            return pq.ParquetFile(path)
        return pq.ParquetFile(fs.open(path, "rb"))
    except FileNotFoundError:
        raise InputError(f"shard listed in the manifest is missing: {url}") from None


def _require_parquet(run: Run, table: str) -> None:
    if run.format(table) != "parquet":
        raise InputError(f"{run.url}: {table} are {run.format(table)}, expected parquet")


def iter_batches(run: Run, table: str, columns: Sequence[str], batch_rows: int = BATCH_ROWS):
    """Stream record batches of some columns of a Parquet table, shard by shard.

    Memory stays bounded by one row group's worth of these columns.
    """
    _require_parquet(run, table)
    for url in run.shard_urls(table):
        with open_parquet(url) as pf:
            yield from pf.iter_batches(columns=list(columns), batch_size=batch_rows)


def iter_row_groups(run: Run, table: str, columns: Sequence[str]):
    """Stream whole row groups (``pyarrow.Table``) of some columns, with their shard and index.

    Yields (url, row group index, table); for joins that need a row group's own
    dictionary of ids (record batches re-send a growing one).
    """
    _require_parquet(run, table)
    for url in run.shard_urls(table):
        with open_parquet(url) as pf:
            for index in range(pf.metadata.num_row_groups):
                yield url, index, pf.read_row_group(index, columns=list(columns))


def fetch_rows(
    run: Run, table: str, key: str, wanted: Iterable[str], columns: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Rows of a Parquet table whose `key` is in `wanted`: {key: {column: value}}.

    Reads the key column of every row group, and the (heavy) other columns only
    of row groups holding a wanted key.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(sorted(set(wanted)), type=pa.string())
    found: dict[str, dict[str, Any]] = {}
    if len(wanted) == 0:
        return found
    _require_parquet(run, table)
    for url in run.shard_urls(table):
        with open_parquet(url) as pf:
            for index in range(pf.metadata.num_row_groups):
                keys = pf.read_row_group(index, columns=[key]).column(key)
                hits = np.flatnonzero(
                    pc.is_in(keys, value_set=wanted).to_numpy(zero_copy_only=False)
                )
                if len(hits) == 0:
                    continue
                rows = pf.read_row_group(index, columns=[key, *columns]).take(hits).to_pylist()
                found.update((row[key], row) for row in rows)
                if len(found) == len(wanted):
                    return found
    return found


class BottomK:
    """A deterministic uniform sample of up to k rows per group, in one streaming pass.

    Each row gets a key from a seeded RNG; a group keeps the rows with the k
    smallest keys (a reservoir sample). Keys are drawn in row order whatever the
    batch sizes, and rows come in the run's order (shards sorted by path, rows
    sorted by id), so the same run gives the same sample, from Parquet or TFRecord.

    Args:
      groups: number of groups (e.g. similarity bins).
      k: rows kept per group.
      seed: RNG seed.
    """

    def __init__(self, groups: int, k: int, seed: int = 0):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = k
        self._rng = np.random.default_rng(seed)
        self._heaps: list[list[tuple[float, int, dict]]] = [[] for _ in range(groups)]
        # A row can only enter its group when its key is below the group's k-th key.
        self._limits = np.full(groups, np.inf)
        self._seen = 0

    def offer(self, group: np.ndarray, batch) -> None:
        """Offer a record batch whose row i belongs to group[i] (rows with group < 0 skip)."""
        keys = self._rng.random(len(group))
        ok = group >= 0
        ok[ok] = keys[ok] < self._limits[group[ok]]
        rows = np.flatnonzero(ok)
        # Only the k smallest keys of each group in this batch can matter: select them
        # vectorised so the Python loop below touches at most groups * k rows.
        order = rows[np.lexsort((keys[rows], group[rows]))]
        sorted_groups = group[order]
        first = np.searchsorted(sorted_groups, sorted_groups, side="left")
        order = order[np.arange(len(order)) - first < self.k]
        if len(order):
            taken = batch.take(order).to_pylist()
            for i, row in zip(order.tolist(), taken, strict=True):
                self._push(int(group[i]), float(keys[i]), self._seen + i, row)
        self._seen += len(group)

    def _push(self, g: int, key: float, serial: int, row: dict) -> None:
        heap = self._heaps[g]
        item = (-key, serial, row)  # max-heap on key; serial breaks (impossible) ties
        if len(heap) < self.k:
            heapq.heappush(heap, item)
        elif key < -heap[0][0]:
            heapq.heapreplace(heap, item)
        if len(heap) == self.k:
            self._limits[g] = -heap[0][0]

    def rows(self, g: int) -> list[dict]:
        """The sampled rows of one group, by key."""
        return [row for _, _, row in sorted(self._heaps[g], key=lambda item: -item[0])]


# --------------------------------------------------------------------------- summary


@dataclass
class PairScan:
    """What one pass over the pair rows found.

    Args:
      kept_by_domain: kept pairs per page domain.
      sample: the sampled pair rows (all columns when they were read, light ones otherwise).
      episode_rows: pair rows of the requested episode (when one was given).
    """

    kept_by_domain: Counter = field(default_factory=Counter)
    sample: list[dict] = field(default_factory=list)
    episode_rows: int = 0


def scan_pairs(run: Run, n: int = 0, episode: str | None = None, seed: int = 0) -> PairScan:
    """One pass over the pair rows: kept pairs per domain, and a sample of n pairs.

    Parquet pairs are read by light columns (the sample's image bytes are fetched
    afterwards); TFRecord pairs through ``pairmill.tfrecord.read_rows``.
    """
    import pyarrow.compute as pc

    sampler = BottomK(1, n, seed) if n > 0 else None
    scan = PairScan()
    for batch in _pair_batches(run):
        _count_domains(batch, scan.kept_by_domain)
        if sampler is None:
            continue
        group = np.zeros(batch.num_rows, dtype=np.int64)
        if episode is not None:
            mine = pc.equal(batch.column("episode_id"), episode).to_numpy(zero_copy_only=False)
            group[~mine] = -1
            scan.episode_rows += int(mine.sum())
        sampler.offer(group, batch)
    if sampler is not None:
        scan.sample = sampler.rows(0)
    return scan


def _pair_batches(run: Run):
    if run.format("pairs") == "parquet":
        yield from iter_batches(run, "pairs", PAIR_LIGHT_COLUMNS)
        return
    if run.format("pairs") != "tfrecord":
        raise InputError(f"{run.url}: cannot read pairs in format {run.format('pairs')}")
    yield from _tfrecord_batches(run)


def _tfrecord_batches(run: Run):
    import pyarrow as pa

    if importlib.util.find_spec("pairmill.tfrecord") is None:
        raise MissingDependencyError("reading TFRecord pairs needs pairmill.tfrecord")
    from pairmill.tfrecord import read_rows

    chunk: list[dict] = []
    for url in run.shard_urls("pairs"):
        for row in read_rows(url):
            chunk.append({k: _text(v) if k in PAIR_LIGHT_COLUMNS else v for k, v in row.items()})
            if len(chunk) == ROW_CHUNK:
                yield pa.RecordBatch.from_pylist(chunk)
                chunk = []
    if chunk:
        yield pa.RecordBatch.from_pylist(chunk)


def _text(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]  # tf.train.Example features are lists
    return value.decode() if isinstance(value, bytes) else value


def _count_domains(batch, counter: Counter) -> None:
    import pyarrow.compute as pc

    # Count page URLs in C++, then map each distinct URL to its domain once.
    counts = pc.value_counts(batch.column("page_url"))
    names = page_domains(counts.field("values"))
    for name, n in zip(names, counts.field("counts").to_pylist(), strict=True):
        counter[name] += n


def summarize(run: Run, top: int = 10, scan: PairScan | None = None) -> dict[str, Any]:
    """The run at a glance: tables, encoder, band, counts, top domains by kept pairs."""
    scan = scan or scan_pairs(run)
    manifest = run.manifest
    tables = {}
    for name in TABLES:
        table = manifest["tables"].get(name)
        if table is not None:
            tables[name] = {
                "format": table.get("format", "parquet"),
                "shards": len(table["shards"]),
                "rows": table["rows"],
                "bytes": table["bytes"],
            }
    return {
        "run": run.url,
        "encoder": {
            "name": run.encoder,
            "weights": run.weights.get("description", ""),
            "semantic": run.semantic,
        },
        "thresholds": {"low": run.low, "high": run.high},
        "tables": tables,
        "counts": manifest["counts"],
        "reconciled": manifest.get("reconciled"),
        "top_domains": [
            {"domain": name or "(none)", "kept": count}
            for name, count in sorted(scan.kept_by_domain.items(), key=lambda kv: (-kv[1], kv[0]))[
                :top
            ]
        ],
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as aligned text."""
    enc = summary["encoder"]
    counts = summary["counts"]
    low, high = summary["thresholds"]["low"], summary["thresholds"]["high"]
    lines = [f"run       {summary['run']}"]
    lines.append(f"encoder   {enc['name']}  weights: {enc['weights'] or '?'}")
    if not enc["semantic"]:
        lines.append("          warning: these weights are not semantic (similarities are noise)")
    lines.append(f"band      {low:g} <= similarity <= {high:g}")
    lines.append("")
    lines.append(f"{'table':<14}{'format':>9}{'shards':>8}{'rows':>12}{'bytes':>14}")
    for name, t in summary["tables"].items():
        lines.append(f"{name:<14}{t['format']:>9}{t['shards']:>8}{t['rows']:>12,}{t['bytes']:>14,}")
    lines.append("")
    lines.append(f"{'records in':<26}{counts['records_in']:>10,}")
    for reason, n in counts.get("rejects", {}).items():
        lines.append(f"{'  rejected ' + reason:<26}{n:>10,}")
    for label, key in (
        ("images", "images"),
        ("episodes", "episodes"),
        ("candidate pairs", "candidate_pairs"),
        ("kept pairs", "kept_pairs"),
    ):
        lines.append(f"{label:<26}{counts.get(key, 0):>10,}")
    if summary.get("reconciled") is False:
        lines.append("warning: counts do not reconcile (records_in != images + rejected)")
    if summary["top_domains"]:
        lines.append("")
        lines.append(f"{'top domains by kept pairs':<40}{'kept':>10}")
        for item in summary["top_domains"]:
            lines.append(f"{item['domain'][:40]:<40}{item['kept']:>10,}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- sheet


def sample_pairs(
    run: Run, n: int, episode: str | None = None, seed: int = 0, scan: PairScan | None = None
) -> list[dict]:
    """n pair rows chosen deterministically (with image bytes), by similarity then id."""
    scan = scan or scan_pairs(run, n, episode, seed)
    if episode is not None and scan.episode_rows == 0:
        raise InputError(f"episode {episode} has no kept pairs in {run.url}")
    rows = scan.sample
    if rows and "cond_image" not in rows[0]:
        heavy = fetch_rows(
            run, "pairs", "pair_id", (r["pair_id"] for r in rows), ("cond_image", "target_image")
        )
        rows = [{**row, **heavy.get(row["pair_id"], {})} for row in rows]
    return sorted(rows, key=lambda r: (r["similarity"], r["pair_id"]))


def pair_caption(row: dict) -> str:
    """'0.734  example.com' under a pair."""
    return f"{row['similarity']:.3f}  {domain(row.get('page_url') or '') or '?'}"


def pairs_sheet(
    run: Run, rows: Sequence[dict], columns: int = 4, thumb: int = 128
) -> tuple[Any, Any]:
    """The contact sheet of these pairs and its layout: (PIL image, `contact.Layout`)."""
    from pairmill import contact

    cells = [
        contact.PairCell(row.get("cond_image"), row.get("target_image"), pair_caption(row))
        for row in rows
    ]
    sheet_rows = contact.grid(cells, columns)
    title = (
        f"{run.url} · {run.encoder} · {run.low:g} <= sim <= {run.high:g} · "
        f"{len(cells)} pairs (cond | target)"
    )
    options = {"columns": columns, "thumb": thumb, "title": title}
    return contact.pair_sheet(sheet_rows, **options), contact.sheet_layout(sheet_rows, **options)


def inspect(
    run_dir: str,
    *,
    png: str | None = None,
    n: int = 16,
    episode: str | None = None,
    seed: int = 0,
    on_png: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Summarise a run (one pass over the pairs) and optionally write a sheet of n pairs."""
    from pairmill import contact

    run = Run(run_dir)
    scan = scan_pairs(run, n if png else 0, episode, seed)
    summary = summarize(run, scan=scan)
    if png:
        rows = sample_pairs(run, n, episode, seed, scan=scan)
        sheet, _ = pairs_sheet(run, rows)
        contact.save_png(sheet, png)
        if on_png:
            on_png(png, len(rows))
    return summary
