"""How fast do pairmill's readers give back the pair shards a build wrote?

Builds (or reuses) a run of a few thousand pairs of real-photo images: a sample crawl
(`pairmill.sample.make_sample_crawl`) embedded by the tiny encoder with the band opened to
[-1, 1] so nearly every candidate pair is kept, written once as Parquet and once as
TFRecord. Then, in one process, times:

  pyarrow              the baseline: ``pq.ParquetFile(f).iter_batches()`` over every column
                       of every pair shard, touching each batch
  read_pairs           `pairmill.data.read_pairs`, no decoding (dict rows, image bytes)
  PairShards           `pairmill.data.PairShards(decode=False)`, iterated directly
  PairShards decode    the same with ``decode=True, image_size=256`` (on the first
                       --decode-rows rows: decoding is the slow part, its rate is stable)
  TFRecord read_pairs  `read_pairs` over the TFRecord shards of the same pairs

Each is run --repeats times, in rounds over all readers, and the best is kept (the files
sit in the page cache after the first pass, so the readers are compared, not the disk).
On a shared machine more repeats (--repeats 10) steady the ratios. MB/s counts shard-file
bytes, pro-rated by rows read. Ratios are rows/s over the pyarrow baseline's rows/s; the
target for Parquet without decoding is >= 0.8.

    python benchmarks/reader_throughput.py --pages 60 --images-per-page 12
    python benchmarks/reader_throughput.py --run runs/web1 --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

TARGET = 0.8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="an existing Parquet run directory (skip the build)")
    p.add_argument("--tfrecord-run", help="an existing TFRecord run directory")
    p.add_argument("--work", help="where to build runs (reused when already built there)")
    p.add_argument("--pages", type=int, default=60)
    p.add_argument("--images-per-page", type=int, default=12)
    p.add_argument("--shard-rows", type=int, default=500)
    p.add_argument("--compression", default="none", help="TFRecord compression: none|gzip")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--decode-rows", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p.parse_args(argv)


def build_run(work: Path, crawl: Path, fmt: str, args: argparse.Namespace) -> Path:
    """A run of `crawl` in `work/fmt`, built unless a finished one is already there."""
    from pipelines import build_pairs

    out = work / fmt
    if (out / "manifest.json").exists():
        return out
    argv = [str(crawl), "--out", str(out), "--encoder", "tiny", "--device", "cpu"]
    argv += ["--low", "-1", "--high", "1", "--shard-rows", str(args.shard_rows), "--overwrite"]
    argv += ["--format", fmt]
    if fmt == "tfrecord":
        argv += ["--compression", args.compression]
    build_pairs.run(argv)
    return out


def prepare_runs(args: argparse.Namespace, work: Path) -> tuple[Path, Path | None]:
    if args.run:
        return Path(args.run), Path(args.tfrecord_run) if args.tfrecord_run else None
    from pairmill.sample import make_sample_crawl

    crawl = work / "crawl" / "crawl.parquet"
    if not crawl.exists():
        make_sample_crawl(crawl.parent, pages=args.pages, images_per_page=args.images_per_page)
    parquet = build_run(work, crawl, "parquet", args)
    tfrecord = Path(args.tfrecord_run) if args.tfrecord_run else None
    return parquet, tfrecord or build_run(work, crawl, "tfrecord", args)


def pair_table(run: Path) -> dict:
    """The manifest's entry for a run's pair table (format, rows, bytes, shards)."""
    return json.loads((run / "manifest.json").read_text())["tables"]["pairs"]


def shard_paths(run: Path) -> list[str]:
    return [str(run / s["path"]) for s in pair_table(run)["shards"] if s["rows"]]


def timed(read: Callable[[], int]) -> tuple[float, int]:
    """Seconds one call took, and the rows it read."""
    started = time.perf_counter()
    rows = read()
    return time.perf_counter() - started, rows


def count(rows: Iterable[object], limit: int | None = None) -> int:
    return sum(1 for _ in itertools.islice(rows, limit))


def pyarrow_baseline(paths: list[str]) -> int:
    import pyarrow.parquet as pq

    rows = 0
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches():
            rows += batch.num_rows  # touch each batch, as any consumer would
    return rows


def measurements(parquet: Path, tfrecord: Path | None, args: argparse.Namespace):
    """(name, run, read) triples; read() returns the number of rows it read."""
    from pairmill.data import PairShards, read_pairs

    paths = shard_paths(parquet)
    yield "pyarrow iter_batches", parquet, lambda: pyarrow_baseline(paths)
    yield "read_pairs", parquet, lambda: count(read_pairs(str(parquet)))
    yield "PairShards", parquet, lambda: count(PairShards(str(parquet), decode=False))
    decoding = PairShards(str(parquet), decode=True, image_size=args.image_size)
    yield (
        f"PairShards decode {args.image_size}px",
        parquet,
        lambda: count(decoding, args.decode_rows),
    )
    if tfrecord is not None:
        yield "TFRecord read_pairs", tfrecord, lambda: count(read_pairs(str(tfrecord)))


def measure(args: argparse.Namespace, parquet: Path, tfrecord: Path | None) -> list[dict]:
    readers = list(measurements(parquet, tfrecord, args))
    best: dict[str, tuple[float, int]] = {}
    # Rounds over all readers rather than each reader's repeats back to back, so that a
    # burst of load on a shared machine cannot favour one reader over the baseline.
    for _ in range(args.repeats):
        for name, _, read in readers:
            best[name] = min(best.get(name, (float("inf"), 0)), timed(read))
    results = []
    for name, run, _ in readers:
        seconds, rows = best[name]
        pairs = pair_table(run)
        megabytes = pairs["bytes"] * rows / max(1, pairs["rows"]) / 1e6
        results.append(
            {
                "reader": name,
                "format": pairs["format"],
                "rows": rows,
                "seconds": round(seconds, 4),
                "rows_per_s": round(rows / seconds, 1),
                "mb_per_s": round(megabytes / seconds, 1),
            }
        )
    baseline = results[0]["rows_per_s"]
    for result in results:
        result["vs_pyarrow"] = round(result["rows_per_s"] / baseline, 3)
    return results


def table(results: list[dict]) -> str:
    lines = [
        f"{'reader':<28} {'format':<9} {'rows':>6} {'rows/s':>10} {'MB/s':>8} {'vs pyarrow':>10}",
    ]
    for r in results:
        lines.append(
            f"{r['reader']:<28} {r['format']:<9} {r['rows']:>6} {r['rows_per_s']:>10,.0f} "
            f"{r['mb_per_s']:>8,.0f} {r['vs_pyarrow']:>10.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pairmill-reader-bench-") as scratch:
        work = Path(args.work) if args.work else Path(scratch)
        parquet, tfrecord = prepare_runs(args, work)
        summary = {
            "parquet_run": str(parquet),
            "pairs": pair_table(parquet)["rows"],
            "parquet_shards": len(shard_paths(parquet)),
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
            "results": measure(args, parquet, tfrecord),
        }
    no_decode = next(r for r in summary["results"] if r["reader"] == "read_pairs")["vs_pyarrow"]
    summary["load_average"] = [round(x, 2) for x in os.getloadavg()]
    summary["target_no_decode"] = TARGET
    summary["meets_target"] = no_decode >= TARGET
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"{summary['pairs']} pairs in {summary['parquet_shards']} Parquet shards; "
        f"best of {args.repeats}; load average {summary['load_average']}"
    )
    print(table(summary["results"]))
    verdict = "meets" if summary["meets_target"] else "MISSES"
    print(f"read_pairs without decoding: {no_decode:.2f} x pyarrow ({verdict} >= {TARGET})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `pipelines`
    sys.exit(main())
