"""Peak memory and wall time of a local `pairmill build` (FnApiRunner) on a synthetic crawl.

Generates a crawl of --records records on pages of --page-min..--page-max images (small
JPEGs, 64-128 px, cut from the real photos scikit-image and scikit-learn ship; every image
distinct), stored inline in Parquet. It then runs `pairmill build --encoder tiny --device cpu`
in a child process twice:

  overhead   the first page alone: what a build costs before it holds any data
  build      the whole crawl

sampling the summed RSS of the child's process tree every 0.1 s (and the kernel's
high-water mark of the largest process, whichever is higher), and prints the peak against
what the run stores: peak RSS / stored image bytes (the images table) and / pair bytes
(the pairs table, where each image is copied once per pair it is in).

    python benchmarks/build_memory.py --records 20000
    python benchmarks/build_memory.py --code /tmp/base   # another checkout's pairmill

--code runs the build from another checkout (its pairmill, pipelines and schemas come
first on PYTHONPATH; the child runs outside both trees), so one script measures before and
after a change with the same crawl. Flags this script does not know (or everything after
``--``) go to `pairmill build`. The crawl in --workdir is reused while its parameters match.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stress_crawl import run_build as stress_run_build  # noqa: E402
from stress_crawl import split_passthrough  # noqa: E402

GENERATOR_VERSION = 1
N_BASES = 64
PHOTO_SIDES = (64, 128)
ROWS_PER_FILE = 5_000
JPEG_QUALITY = 85


def _bases(seed: int) -> list[np.ndarray]:
    from pairmill.sample import real_photos, variant

    rng = np.random.default_rng(seed)
    photos = real_photos()
    return [np.asarray(variant(photos[i % len(photos)][1], rng, 128, 160)) for i in range(N_BASES)]


def _jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _photo(bases: list[np.ndarray], rng: np.random.Generator, k: int) -> bytes:
    base = bases[int(rng.integers(0, len(bases)))]
    height, width = (int(rng.integers(PHOTO_SIDES[0], PHOTO_SIDES[1] + 1)) for _ in range(2))
    top = int(rng.integers(0, base.shape[0] - height + 1))
    left = int(rng.integers(0, base.shape[1] - width + 1))
    pixels = base[top : top + height, left : left + width].copy()
    flat = pixels.reshape(-1, 3)
    for j in range(4):  # a few pixels from the serial number: every image distinct
        mixed = (k * 2_654_435_761 + j * 40_503 + 12_345) & 0xFFFFFFFF
        flat[mixed % len(flat)] = (mixed >> 8 & 255, mixed >> 16 & 255, mixed >> 24 & 255)
    return _jpeg(pixels)


def page_sizes(records: int, low: int, high: int, seed: int) -> list[int]:
    """Sizes of the crawl's pages: uniform in [low, high], the last one topping up."""
    rng = np.random.default_rng(seed)
    sizes, left = [], records
    while left > 0:
        size = int(rng.integers(low, high + 1))
        size = left if left - size < low else min(size, left)
        sizes.append(size)
        left -= size
    return sizes


def generate(directory: Path, records: int, low: int, high: int, seed: int) -> list[Path]:
    """Write the crawl under `directory` (reused when its parameters match); its files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {"generator": GENERATOR_VERSION, "records": records, "pages": [low, high]}
    meta["seed"] = seed
    meta_path = directory / "crawl.json"
    if meta_path.exists():
        stored = json.loads(meta_path.read_text())
        files = [directory / name for name in stored.get("files", [])]
        if {k: stored.get(k) for k in meta} == meta and all(f.exists() for f in files):
            return files
    meta_path.unlink(missing_ok=True)
    bases, rng = _bases(seed), np.random.default_rng(seed + 1)
    rows = []
    for page, size in enumerate(page_sizes(records, low, high, seed)):
        page_url = f"https://site{page % 31}.example.com/articles/{page}"
        for i in range(size):
            rows.append((page_url, f"https://img{page % 7}.example.com/{page}/{i}.jpg"))
    order = np.random.default_rng(seed + 2).permutation(len(rows))  # pages spread over files
    files = []
    for start in range(0, len(rows), ROWS_PER_FILE):
        chosen = [rows[int(i)] for i in order[start : start + ROWS_PER_FILE]]
        images = [_photo(bases, rng, start + j) for j in range(len(chosen))]
        path = directory / f"crawl-{start // ROWS_PER_FILE:05d}.parquet"
        table = pa.table(
            {
                "page_url": pa.array([page for page, _ in chosen], pa.string()),
                "image_url": pa.array([url for _, url in chosen], pa.string()),
                "image": pa.array(images, pa.binary()),
            }
        )
        pq.write_table(table, path, row_group_size=1_000)
        files.append(path)
    meta["files"] = [f.name for f in files]
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return files


def first_page(files: list[Path], out: Path) -> Path:
    """A crawl of the first file's first page only (for the fixed overhead)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(files[0])
    page = table.column("page_url")[0].as_py()
    pq.write_table(table.filter(pc.equal(table.column("page_url"), page)), out)
    return out


def run_build(files: list[Path], out: Path, code: Path | None, extra: list[str], log: Path):
    """Run `pairmill build` in a child process (importing pairmill from `code` if given):
    wall time, peak memory, exit status."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code), env.get("PYTHONPATH", "")) if p)
    probe = "import pairmill, pipelines.build_pairs as b; print(b.__file__)"
    source = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=out.parent, capture_output=True, text=True
    ).stdout.strip()
    # Run outside the source trees: `-m` puts the working directory first on sys.path.
    build = stress_run_build(files, out, extra, log, env=env, cwd=out.parent, interval=0.1)
    largest = build["max_process_rss"] or 0
    return {
        "command": build["command"],
        "code": source,
        "returncode": build["returncode"],
        "wall_s": build["wall_s"],
        "peak_rss": max(build["peak_tree_rss"], largest),
    }


def parse_args(argv: list[str] | None):
    argv, passthrough = split_passthrough(argv)
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other flags are passed to `pairmill build`.",
        allow_abbrev=False,
    )
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--page-min", type=int, default=8)
    p.add_argument("--page-max", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the crawl here between runs (default: a temp dir)")
    p.add_argument("--code", type=Path, help="run the build from this checkout")
    p.add_argument("--no-overhead", action="store_true", help="skip the one-page build")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args, unknown = p.parse_known_args(argv)
    if not 2 <= args.page_min <= args.page_max:
        p.error("need 2 <= --page-min <= --page-max")
    return args, unknown + passthrough


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    temporary = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pairmill-memory-")).resolve()
    (workdir / "crawl").mkdir(parents=True, exist_ok=True)
    code = args.code.resolve() if args.code else None
    try:
        started = time.perf_counter()
        files = generate(workdir / "crawl", args.records, args.page_min, args.page_max, args.seed)
        generated = time.perf_counter() - started
        overhead = None
        if not args.no_overhead:
            one = first_page(files, workdir / "one-page.parquet")
            overhead = run_build([one], workdir / "run-one", code, extra, workdir / "one.log")
        build = run_build(files, workdir / "run", code, extra, workdir / "build.log")
        for result, log in ((overhead, "one.log"), (build, "build.log")):
            if result is not None and result["returncode"] != 0:
                print((workdir / log).read_text(errors="replace")[-4000:], file=sys.stderr)
                print(f"FAIL: pairmill build exited {result['returncode']}", file=sys.stderr)
                return 1
        manifest = json.loads((workdir / "run" / "manifest.json").read_text())
        report = _report(args, extra, files, generated, overhead, build, manifest)
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for name in ("run", "run-one"):
                shutil.rmtree(workdir / name, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


def _report(args, extra, files, generated, overhead, build, manifest) -> dict:
    mib = 2**20
    tables = manifest["tables"]
    counts = manifest["counts"]
    images, pairs = tables["images"]["bytes"], tables["pairs"]["bytes"]
    peak = build["peak_rss"]
    fixed = overhead["peak_rss"] if overhead else 0
    return {
        "records": args.records,
        "pages": [args.page_min, args.page_max],
        "crawl_mib": round(sum(f.stat().st_size for f in files) / mib, 1),
        "generate_s": round(generated, 1),
        "build_flags": extra,
        "code": build["code"],
        "code_sha256": hashlib.sha256(Path(build["code"]).read_bytes()).hexdigest()[:12]
        if build["code"]
        else None,
        "wall_s": round(build["wall_s"], 1),
        "pipeline_s": manifest["timing"]["seconds"],
        "peak_rss_mib": round(peak / mib, 1),
        "overhead_rss_mib": round(fixed / mib, 1) if overhead else None,
        "overhead_wall_s": round(overhead["wall_s"], 1) if overhead else None,
        "images": counts["images"],
        "episodes": counts["episodes"],
        "candidate_pairs": counts["candidate_pairs"],
        "kept_pairs": counts["kept_pairs"],
        "images_table_mib": round(images / mib, 1),
        "pairs_table_mib": round(pairs / mib, 1),
        "pair_shards": len(tables["pairs"]["shards"]),
        "peak_per_image_byte": round(peak / max(1, images), 2),
        "peak_over_overhead_per_image_byte": round((peak - fixed) / max(1, images), 2),
        "peak_per_pair_byte": round(peak / max(1, pairs), 3),
    }


def _print(report: dict) -> None:
    print(
        f"build memory: {report['records']:,} records on pages of "
        f"{report['pages'][0]}-{report['pages'][1]} images ({report['crawl_mib']} MiB crawl); "
        f"tiny encoder, cpu"
        + (f"; build flags: {' '.join(report['build_flags'])}" if report["build_flags"] else "")
    )
    print(f"code: {report['code']}")
    rows = [
        ("wall s (whole process)", f"{report['wall_s']:.1f}"),
        ("pipeline s (manifest)", f"{report['pipeline_s']:.1f}"),
        ("peak RSS MiB (process tree)", f"{report['peak_rss_mib']:,.1f}"),
        ("  one-page build MiB (overhead)", f"{report['overhead_rss_mib']}"),
        ("images / episodes", f"{report['images']:,} / {report['episodes']:,}"),
        ("candidate / kept pairs", f"{report['candidate_pairs']:,} / {report['kept_pairs']:,}"),
        ("images table MiB", f"{report['images_table_mib']:,.1f}"),
        ("pairs table MiB", f"{report['pairs_table_mib']:,.1f} ({report['pair_shards']} shards)"),
        ("peak RSS / image bytes", f"{report['peak_per_image_byte']:.2f}"),
        ("(peak - overhead) / image bytes", f"{report['peak_over_overhead_per_image_byte']:.2f}"),
        ("peak RSS / pair bytes", f"{report['peak_per_pair_byte']:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>22}")


if __name__ == "__main__":
    sys.exit(main())
