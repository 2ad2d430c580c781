"""Throughput and memory of `pairmill hist` / `calibrate` on synthetic candidate pairs.

Writes N candidate rows (default 10M) as similarities Parquet shards laid out as
the pipeline writes them (zstd, dictionary-encoded ids, ~64 MB row groups, rows
sorted by pair id), plus the images table's episode/page columns for --by-domain.
Then, in a fresh process state, times against a baseline in the same process:

  baseline     pyarrow reading the `similarity` column alone (record batches)
  hist         band counts + 40-bin histogram (what `pairmill hist` computes)
  by-domain    the same plus the episode -> page-domain join
  calibrate    --keep-fraction (three streaming passes: count, fine bins, one bin)

and prints rows/s, the ratio to the baseline, and peak memory: tracemalloc
(numpy), the Arrow memory pool's peak, and the process's max RSS.

    python benchmarks/hist_throughput.py [--rows 10000000] [--shards 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

PAIRS_PER_EPISODE = 45  # ten images per page
DOMAINS = 500


def _hex_ids(rng: np.random.Generator, n: int):
    """n random 16-hex-character ids as a pyarrow string array (vectorised, no Python loop)."""
    import pyarrow as pa

    digits = np.frombuffer(b"0123456789abcdef", dtype="S1")
    raw = rng.integers(0, 16, size=(n, 16), dtype=np.uint8)
    fixed = digits[raw].view("S16").ravel()
    return pa.array(fixed, type=pa.binary(16)).cast(pa.string())


def write_data(out: Path, rows: int, shards: int, seed: int = 0) -> None:
    """The similarities shards and a light images table under `out` (plus manifest.json)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import schemas
    from pairmill.shards import ROW_GROUP_BYTES

    rng = np.random.default_rng(seed)
    episodes = max(1, rows // PAIRS_PER_EPISODE)
    episode_ids = _hex_ids(rng, episodes)
    schema = schemas.load("similarity").arrow()
    (out / "similarities").mkdir(parents=True)
    listed = []
    per_shard = -(-rows // shards)
    for i in range(shards):
        n = min(per_shard, rows - i * per_shard)
        pair_ids = _hex_ids(rng, n)
        # DINOv2-like: most pairs unrelated, a bump of near-duplicates.
        sims = np.where(rng.random(n) < 0.15, rng.normal(0.93, 0.04, n), rng.normal(0.3, 0.15, n))
        sims = np.clip(sims, -1, 1).astype(np.float32)
        table = pa.table(
            {
                "pair_id": pair_ids,
                "episode_id": episode_ids.take(rng.integers(0, episodes, n)),
                "cond_image_id": _hex_ids(rng, n),
                "target_image_id": _hex_ids(rng, n),
                "similarity": sims,
                "kept": pa.array((sims >= 0.3) & (sims <= 0.9)),
            },
            schema=schema,
        ).sort_by("pair_id")
        path = f"similarities/similarities-{i:05d}-of-{shards:05d}.parquet"
        row_bytes = max(1, table.nbytes // max(1, n))
        pq.write_table(
            table,
            out / path,
            compression="zstd",
            use_dictionary=["pair_id", "episode_id", "cond_image_id", "target_image_id", "kept"],
            row_group_size=ROW_GROUP_BYTES // row_bytes,
        )
        listed.append({"path": path, "rows": n, "bytes": (out / path).stat().st_size})
    domain_of = rng.integers(0, DOMAINS, episodes)
    pages = pa.array([f"https://site{d}.example/page" for d in domain_of.tolist()])
    (out / "images").mkdir()
    pq.write_table(
        pa.table({"episode_id": episode_ids, "page_url": pages}), out / "images/images.parquet"
    )
    manifest = {
        "encoder": {"name": "synthetic", "weights": {"description": "none", "semantic": True}},
        "thresholds": {"low": 0.3, "high": 0.9},
        "counts": {"candidate_pairs": rows},
        "tables": {
            "similarities": {"format": "parquet", "shards": listed},
            "images": {"format": "parquet", "shards": [{"path": "images/images.parquet"}]},
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest))


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(name: str, fn, rows: int) -> dict:
    """Run fn once, with tracemalloc and a proxy Arrow pool counting peaks."""
    import pyarrow as pa

    previous = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(previous)
    pa.set_memory_pool(pool)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        fn()
        seconds = time.perf_counter() - started
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)
    return {
        "name": name,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds),
        "tracemalloc_peak_mb": round(traced_peak / 2**20, 2),
        "arrow_pool_peak_mb": round(pool.max_memory() / 2**20, 2),
        "maxrss_mb": round(_maxrss_mb(), 1),
    }


def baseline(run_dir: str) -> int:
    """pyarrow alone: stream the similarity column, touching every batch."""
    from pairmill.inspect_run import BATCH_ROWS, Run, open_parquet

    total = 0
    for url in Run(run_dir).shard_urls("similarities"):
        with open_parquet(url) as pf:
            for batch in pf.iter_batches(columns=["similarity"], batch_size=BATCH_ROWS):
                total += len(batch.column(0).to_numpy())
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument(
        "--dir", help="keep the data here and reuse it next time (default: a temporary directory)"
    )
    parser.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.write_only:
        write_data(Path(args.dir), args.rows, args.shards)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.dir or tmp) / "run"
        started = time.perf_counter()
        if not (run_dir / "manifest.json").exists():  # --dir keeps data for later runs
            # Written by a child process, so this process's max RSS reflects reading only.
            child = [sys.executable, __file__, "--write-only", "--dir", str(run_dir)]
            child += ["--rows", str(args.rows), "--shards", str(args.shards)]
            subprocess.run(child, check=True)
        written = time.perf_counter() - started
        report = run_benchmarks(str(run_dir), args.rows)
        report["write_seconds"] = round(written, 1)
        report["bytes_on_disk"] = sum(p.stat().st_size for p in run_dir.rglob("*.parquet"))
    print(json.dumps(report, indent=2) if args.json else _table(report))


def run_benchmarks(run_dir: str, rows: int) -> dict:
    from pairmill import calibrate, hist

    baseline(run_dir)  # warm-up: imports, and the files in the page cache for every contender
    rss_before = round(_maxrss_mb(), 1)
    results = []
    expected = {}
    for name, fn in (
        (
            "baseline (pyarrow, similarity column)",
            lambda: expected.setdefault("n", baseline(run_dir)),
        ),
        (
            "hist (band counts + 40 bins)",
            lambda: expected.setdefault("h", hist.histogram_run(run_dir)),
        ),
        ("hist --by-domain", lambda: hist.histogram_run(run_dir, by_domain=True)),
        ("calibrate --keep-fraction (3 passes)", lambda: calibrate.keep_fraction(run_dir, 0.5)),
    ):
        results.append(measure(name, fn, rows))
    assert expected["n"] == rows and expected["h"].candidates == rows
    base = results[0]["rows_per_s"]
    for r in results:
        r["vs_baseline"] = round(r["rows_per_s"] / base, 3)
    return {"rows": rows, "maxrss_mb_before": rss_before, "results": results}


def _table(report: dict) -> str:
    lines = [
        f"{report['rows']:,} candidate rows, {report['bytes_on_disk'] / 2**20:.0f} MiB of Parquet "
        f"(written in {report['write_seconds']} s); max RSS after imports and a warm-up read "
        f"{report['maxrss_mb_before']} MB",
        f"{'':40}{'rows/s':>14}{'x base':>8}{'seconds':>9}{'numpy MB':>10}{'arrow MB':>10}"
        f"{'maxRSS MB':>11}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['name']:40}{r['rows_per_s']:>14,}{r['vs_baseline']:>8.2f}{r['seconds']:>9.2f}"
            f"{r['tracemalloc_peak_mb']:>10.2f}{r['arrow_pool_peak_mb']:>10.2f}{r['maxrss_mb']:>11.1f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
