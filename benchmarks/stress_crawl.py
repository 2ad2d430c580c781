"""Stress a whole `pairmill build` with a large, messy crawl: wall time, memory, exact counts.

Generates a crawl of --records records (default 200,000) of small JPEGs (64-128 px) cut
from the real photos scikit-image and scikit-learn ship, shaped like the web at its worst:

  - one hot page holding a quarter of all records (50,000 at 200k), far over the cap
  - single-image pages (a twentieth: 10,000 at 200k); the rest on pages of 2-30 images
  - junk, a few percent each: the same URL twice on a page, the same bytes under another
    URL on a page, truncated JPEGs, HTML served as an image, empty bytes, tiny images,
    panoramas, records with no page_url or an unparsable one, page URLs written with a
    tracking parameter (``?utm_source=x``), and one logo (identical bytes) on many pages

stored inline in several Parquet files (row groups of up to 5,000 rows, records shuffled so
the hot page is spread over every file and bundle). It then runs `pairmill build --encoder
tiny --device cpu` in a child process, timing it and sampling the memory of the child's
whole process tree, and checks the run against an independent prediction of every record's
fate made from the documented rules: a record with no page_url is `missing_field`, one with
an unparsable page_url `bad_page_url`; per canonical page the cap keeps the images with the
smallest URL hashes (`capped` beyond), the first record of an image URL wins (`duplicate`
after); then `empty`; `boilerplate` when the same bytes are on more than
--max-pages-per-image pages (if the build has that limit); the same bytes twice on a page
keep the smallest image id (`duplicate`); then decoding (`decode_error`) and the size checks
(`too_small`, `bad_aspect`). The prediction uses the build's own config from manifest.json,
so Beam or pairmill flags given here (e.g. --min-side 32) are predicted too. The images and
rejects tables are then read back (key columns only) and compared record by record: each
input record in exactly one row, with its predicted outcome and episode.

Peak memory is the summed RSS of the build's process tree sampled every 0.25 s, or the
kernel's high-water mark of its largest process if that is higher (with
--direct_running_mode multi_processing the sum counts pages the workers share once each).

    python benchmarks/stress_crawl.py --records 20000
    python benchmarks/stress_crawl.py --workdir /tmp/stress --keep \\
        --direct_num_workers 2 --direct_running_mode multi_processing

Flags this script does not know (or everything after ``--``) go to `pairmill build`. The
crawl in --workdir is reused while --records, --crawl-seed and the generator are the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GENERATOR_VERSION = 1
JUNK = {  # planted records, as a fraction of --records
    "url_duplicate": 0.02,
    "content_duplicate": 0.02,
    "truncated": 0.015,
    "html": 0.01,
    "empty": 0.01,
    "tiny": 0.015,
    "panorama": 0.01,
    "no_page_url": 0.01,
    "bad_page_url": 0.005,
    "logo": 0.02,
}
HOT_FRACTION = 0.25  # of --records: 50,000 at 200k
SINGLE_FRACTION = 0.05  # of --records: 10,000 single-image pages at 200k
HOT_DUPLICATE_FRACTION = 0.02  # of the hot page's records: its URL duplicates
TRACKING_FRACTION = 0.03  # records whose page URL carries ?utm_source=x
PAGE_SIZES = (2, 30)
PHOTO_SIDES = (64, 128)
TINY_SIDES = (8, 48)
PANORAMA_SHORT = (64, 96)
LOGO_SIZE = (120, 90)
LOGO_URL = "https://static.example.net/brand/logo.jpg"
HOT_PAGE = "https://forum.example.com/threads/everything?page=1"
N_BASES = 200
BRIGHTNESS = (-24, -8, 8, 24)
JPEG_QUALITY = 85
MIN_RECORDS = 2000
# Reasons the crawl always plants; boilerplate too when the build limits pages per image.
PLANTED_REASONS = (
    "missing_field",
    "bad_page_url",
    "capped",
    "duplicate",
    "empty",
    "decode_error",
    "too_small",
    "bad_aspect",
)


@dataclass(slots=True)
class Planned:
    """One crawl record as planned: what is written, and what predicting its fate needs.

    Args:
      page: the page's URL as written without tracking (its episode), None if unusable.
      page_url: the page URL as written in the crawl.
      image_url: the image URL.
      kind: photo, truncated, html, empty, tiny, panorama or logo.
      spec: what `_render` needs to make the bytes (the same spec gives the same bytes).
      width, height: the image's size, for decodable kinds.
    """

    page: str | None
    page_url: str | None
    image_url: str
    kind: str
    spec: tuple = ()
    width: int = 0
    height: int = 0


# --------------------------------------------------------------------------- planning


def crawl_shape(n: int) -> dict[str, int]:
    """How many records of each sort a crawl of `n` records has."""
    hot = int(n * HOT_FRACTION)
    shape = {
        "hot": hot,
        "hot_duplicates": round(hot * HOT_DUPLICATE_FRACTION),
        "singles": int(n * SINGLE_FRACTION),
    }
    shape.update({name: round(n * fraction) for name, fraction in JUNK.items()})
    shape["normal"] = n - hot - shape["singles"] - sum(round(n * f) for f in JUNK.values())
    return shape


def _tracked(url: str) -> str:
    return url + ("&" if "?" in url else "?") + "utm_source=x"


def plan_crawl(n: int, seed: int) -> tuple[list[Planned], np.ndarray]:
    """The records of the crawl (in page order) and the photo table their specs index."""
    rng = np.random.default_rng(seed)
    shape = crawl_shape(n)
    # One row per distinct photo: base, brightness, height, width, top and left (per 10,000).
    photos = np.stack(
        [
            rng.integers(0, N_BASES, n),
            rng.integers(0, len(BRIGHTNESS), n),
            rng.integers(PHOTO_SIDES[0], PHOTO_SIDES[1] + 1, n),
            rng.integers(PHOTO_SIDES[0], PHOTO_SIDES[1] + 1, n),
            rng.integers(0, 10_000, n),
            rng.integers(0, 10_000, n),
        ],
        axis=1,
    ).astype(np.int64)
    serial = iter(range(n))

    def photo(page: str | None, page_url: str | None, image_url: str) -> Planned:
        k = next(serial)
        width, height = int(photos[k, 3]), int(photos[k, 2])
        return Planned(page, page_url, image_url, "photo", (k,), width, height)

    records: list[Planned] = []
    hot_unique = shape["hot"] - shape["hot_duplicates"]
    for i in range(hot_unique):
        records.append(photo(HOT_PAGE, HOT_PAGE, f"https://img.forum.example.com/a/{i}.jpg"))
    for i in rng.integers(0, hot_unique, shape["hot_duplicates"]):
        records.append(_copy(records[int(i)]))
    for j in range(shape["singles"]):
        page = f"https://blog{j % 53}.example.org/posts/{j}"
        records.append(photo(page, page, f"https://blog{j % 53}.example.org/media/{j}.jpg"))
    pages: list[str] = []
    normal_first, left, j = len(records), shape["normal"], 0
    while left > 0:
        size = int(rng.integers(PAGE_SIZES[0], PAGE_SIZES[1] + 1))
        size = left if left - size < PAGE_SIZES[0] else size
        page = f"https://shop{j % 97}.example.com/items/{j}?lang=en"
        host = f"https://cdn{j % 7}.example.com/{j}"
        records.extend(photo(page, page, f"{host}/{k}.jpg") for k in range(size))
        pages.append(page)
        left, j = left - size, j + 1
    normal = records[normal_first:]
    _plant_junk(records, normal, pages, shape, rng, photo)
    for record in records:  # some records name their page with a tracking parameter
        if record.page is not None and rng.random() < TRACKING_FRACTION:
            record.page_url = _tracked(record.page)
    assert len(records) == n, (len(records), n)
    return records, photos


def _copy(record: Planned, image_url: str | None = None) -> Planned:
    return Planned(
        record.page,
        record.page,
        image_url or record.image_url,
        record.kind,
        record.spec,
        record.width,
        record.height,
    )


def _plant_junk(records, normal, pages, shape, rng, photo) -> None:
    def some_page() -> str:
        return pages[int(rng.integers(len(pages)))]

    for i in rng.integers(0, len(normal), shape["url_duplicate"]):
        records.append(_copy(normal[int(i)]))
    for k, i in enumerate(rng.integers(0, len(normal), shape["content_duplicate"])):
        records.append(_copy(normal[int(i)], f"https://mirror.example.com/copy/{k}.jpg"))
    for k in range(shape["truncated"]):
        page = some_page()
        record = photo(page, page, f"https://cdn.example.com/broken/{k}.jpg")
        record.kind, record.spec = "truncated", (*record.spec, int(rng.integers(50, 86)))
        records.append(record)
    for k in range(shape["html"]):
        page = some_page()
        records.append(Planned(page, page, f"https://cdn.example.com/gone/{k}.jpg", "html", (k,)))
    for k in range(shape["empty"]):
        page = some_page()
        records.append(Planned(page, page, f"https://cdn.example.com/empty/{k}.jpg", "empty"))
    for k in range(shape["tiny"]):
        page = some_page()
        record = photo(page, page, f"https://cdn.example.com/icons/{k}.jpg")
        height, width = (int(v) for v in rng.integers(TINY_SIDES[0], TINY_SIDES[1] + 1, 2))
        record.kind, record.spec = "tiny", (record.spec[0], height, width)
        record.width, record.height = width, height
        records.append(record)
    for k in range(shape["panorama"]):
        page = some_page()
        record = photo(page, page, f"https://cdn.example.com/banners/{k}.jpg")
        short = int(rng.integers(PANORAMA_SHORT[0], PANORAMA_SHORT[1] + 1))
        long = int(short * rng.uniform(3.5, 5.0))
        width, height = (long, short) if rng.random() < 0.8 else (short, long)
        record.kind, record.spec = "panorama", (record.spec[0], width, height)
        record.width, record.height = width, height
        records.append(record)
    for k in range(shape["no_page_url"]):
        records.append(
            photo(None, None if k % 2 else "", f"https://cdn.example.com/orphans/{k}.jpg")
        )
    for k in range(shape["bad_page_url"]):
        # No scheme: a crawler that stored the URL as the user typed it.
        page_url = f"www.site{k % 13}.example.com/page/{k}"
        records.append(photo(None, page_url, f"https://cdn.example.com/lost/{k}.jpg"))
    logo_pages = rng.choice(len(pages), size=shape["logo"], replace=len(pages) < shape["logo"])
    for i in logo_pages:
        page = pages[int(i)]
        records.append(Planned(page, page, LOGO_URL, "logo", (), *LOGO_SIZE))


# --------------------------------------------------------------------------- generating

_STATE: dict = {}  # set before forking: the plan, photo table and base thumbnails


def make_bases(seed: int) -> list[list[np.ndarray]]:
    """N_BASES thumbnails (shorter side 128-160) of the real photos, at each brightness."""
    from pairmill.sample import real_photos, variant

    rng = np.random.default_rng(seed + 1)
    photos = real_photos()
    bases = []
    for i in range(N_BASES):
        base = np.asarray(variant(photos[i % len(photos)][1], rng, 128, 160), dtype=np.int16)
        bases.append([np.clip(base + shift, 0, 255).astype(np.uint8) for shift in BRIGHTNESS])
    return bases


def _photo_pixels(k: int) -> np.ndarray:
    base_index, bright, height, width, top, left = (int(v) for v in _STATE["photos"][k])
    base = _STATE["bases"][base_index][bright]
    rows, cols = base.shape[:2]
    top, left = top * (rows - height) // 10_000, left * (cols - width) // 10_000
    pixels = base[top : top + height, left : left + width].copy()
    # A few pixels set from the serial number make every photo's content distinct.
    flat = pixels.reshape(-1, 3)
    for j in range(4):
        mixed = (k * 2_654_435_761 + j * 40_503 + 12_345) & 0xFFFFFFFF
        flat[mixed % len(flat)] = (mixed >> 8 & 255, mixed >> 16 & 255, mixed >> 24 & 255)
    return pixels


def _jpeg(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _render(record: Planned) -> bytes:
    kind, spec = record.kind, record.spec
    if kind == "photo":
        return _jpeg(_photo_pixels(spec[0]))
    if kind == "truncated":
        data = _jpeg(_photo_pixels(spec[0]))
        return data[: len(data) * spec[1] // 100]
    if kind == "tiny":
        return _jpeg(np.ascontiguousarray(_photo_pixels(spec[0])[: spec[1], : spec[2]]))
    if kind == "panorama":
        from PIL import Image

        image = Image.fromarray(_photo_pixels(spec[0])).resize((spec[1], spec[2]))
        return _jpeg(np.asarray(image))
    if kind == "logo":
        pixels = _STATE["bases"][0][2][: LOGO_SIZE[1], : LOGO_SIZE[0]].copy()
        pixels[30:60] = (250, 250, 250)
        return _jpeg(pixels)
    if kind == "html":
        return (
            b"<!DOCTYPE html><html><head><title>404 Not Found</title></head>"
            b"<body><h1>Not Found</h1><p>request %d</p></body></html>" % spec[0]
        )
    if kind == "empty":
        return b""
    raise ValueError(f"unknown kind {kind}")


def _write_file(job: tuple[str, list[int], int]) -> list[str]:
    """Render and write one crawl file; the SHA-256 of each row's bytes, in row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, indices, row_group = job
    plan = _STATE["plan"]
    page_urls, image_urls, images, digests = [], [], [], []
    for index in indices:
        record = plan[index]
        data = _render(record)
        page_urls.append(record.page_url)
        image_urls.append(record.image_url)
        images.append(data)
        digests.append(hashlib.sha256(data).hexdigest())
    table = pa.table(
        {
            "page_url": pa.array(page_urls, pa.string()),
            "image_url": pa.array(image_urls, pa.string()),
            "image": pa.array(images, pa.binary()),
        }
    )
    pq.write_table(table, path, row_group_size=row_group)
    return digests


@dataclass
class Crawl:
    """A generated crawl and what predicting its outcome needs.

    Args:
      files: the crawl files, in name order (the order of the pipeline's record keys).
      plan: the records, indexed like `keys` and `sha256`.
      keys: (file index, row) of each planned record.
      sha256: hex digest of each record's bytes.
      seconds: time to generate, or 0.0 when reused.
    """

    files: list[Path]
    plan: list[Planned]
    keys: list[tuple[int, int]]
    sha256: list[str]
    seconds: float = 0.0


def generate(directory: Path, n: int, seed: int, workers: int) -> Crawl:
    """Write the crawl under `directory`/crawl (and its plan); reuse one already there."""
    meta = {"generator": GENERATOR_VERSION, "records": n, "crawl_seed": seed}
    meta_path, plan_path = directory / "plan.json", directory / "plan.pkl"
    if meta_path.exists() and plan_path.exists():
        stored = json.loads(meta_path.read_text())
        files = [directory / "crawl" / name for name in stored.get("files", [])]
        if {k: stored.get(k) for k in meta} == meta and all(f.exists() for f in files):
            with plan_path.open("rb") as handle:
                plan, keys, digests = pickle.load(handle)
            return Crawl(files, plan, keys, digests)
    started = time.perf_counter()
    meta_path.unlink(missing_ok=True)  # a half-written crawl must never pass for a whole one
    crawl_dir = directory / "crawl"
    shutil.rmtree(crawl_dir, ignore_errors=True)
    crawl_dir.mkdir(parents=True)
    plan, photos = plan_crawl(n, seed)
    order = np.random.default_rng(seed + 2).permutation(n)
    n_files = max(2, min(16, math.ceil(n / 25_000)))
    per_file = math.ceil(n / n_files)
    row_group = max(250, min(5_000, per_file // 4))
    files = [crawl_dir / f"crawl-{i:05d}.parquet" for i in range(n_files)]
    jobs = [
        (str(path), [int(x) for x in order[i * per_file : (i + 1) * per_file]], row_group)
        for i, path in enumerate(files)
    ]
    _STATE.update(plan=plan, photos=photos, bases=make_bases(seed))
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            file_digests = pool.map(_write_file, jobs, chunksize=1)
    else:
        file_digests = [_write_file(job) for job in jobs]
    _STATE.clear()
    keys: list[tuple[int, int]] = [(0, 0)] * n
    digests: list[str] = [""] * n
    for file_index, ((_, indices, _), found) in enumerate(zip(jobs, file_digests, strict=True)):
        for row, (index, digest) in enumerate(zip(indices, found, strict=True)):
            keys[index], digests[index] = (file_index, row), digest
    with plan_path.open("wb") as handle:
        pickle.dump((plan, keys, digests), handle, protocol=pickle.HIGHEST_PROTOCOL)
    meta["files"] = [f.name for f in files]
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return Crawl(files, plan, keys, digests, time.perf_counter() - started)


# --------------------------------------------------------------------------- predicting


@dataclass
class Prediction:
    """What the build must produce.

    Args:
      outcome: per planned record, "image" or the reject reason.
      episode: per planned record, its episode id (None without a usable page URL).
      counts: the manifest counts that follow (all but kept_pairs).
      hot: the hot page's episode id, records, images, capped and duplicates.
    """

    outcome: list[str]
    episode: list[str | None]
    counts: dict
    hot: dict


def predict(crawl: Crawl, config: dict) -> Prediction:
    """Each record's fate under the build's config, from the documented rules alone."""
    from pairmill import urls

    plan, keys, digests = crawl.plan, crawl.keys, crawl.sha256
    cap = int(config.get("max_images_per_episode", 64))
    min_side = int(config.get("min_side", 64))
    max_aspect = float(config.get("max_aspect", 3.0))
    max_pixels = int(config.get("max_pixels", 64 * 2**20))
    max_pages = config.get("max_pages_per_image") or None
    n = len(plan)
    outcome: list[str | None] = [None] * n
    episode: list[str | None] = [None] * n
    image_ids: list[str] = [""] * n
    by_page: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(plan):
        if not (record.page_url or "").strip():
            outcome[i] = "missing_field"
        elif record.page is None:
            outcome[i] = "bad_page_url"
        else:
            by_page[record.page].append(i)
    episode_of = {page: urls.episode_id(urls.canonicalize_url(page)) for page in by_page}
    survivors: list[int] = []
    for page, members in by_page.items():
        eid = episode_of[page]
        by_url: dict[str, list[int]] = defaultdict(list)
        for i in members:
            episode[i] = eid
            image_ids[i] = urls.image_id(eid, plan[i].image_url)
            by_url[image_ids[i]].append(i)
        kept = sorted(by_url)[:cap]  # the cap keeps the smallest URL hashes
        for image_id in by_url.keys() - set(kept):
            for i in by_url[image_id]:
                outcome[i] = "capped"
        for image_id in kept:
            first, *rest = sorted(by_url[image_id], key=keys.__getitem__)
            survivors.append(first)
            for i in rest:
                outcome[i] = "duplicate"
    loaded = []
    for i in survivors:
        if plan[i].kind == "empty":
            outcome[i] = "empty"
        else:
            loaded.append(i)
    if max_pages:
        pages_of: dict[str, set] = defaultdict(set)
        for i in loaded:
            pages_of[digests[i]].add(episode[i])
        over = {digest for digest, pages in pages_of.items() if len(pages) > max_pages}
        for i in loaded:
            if digests[i] in over:
                outcome[i] = "boilerplate"
        loaded = [i for i in loaded if outcome[i] is None]
    same_bytes: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i in loaded:
        same_bytes[(episode[i], digests[i])].append(i)
    for members in same_bytes.values():
        first, *rest = sorted(members, key=lambda i: (image_ids[i], keys[i]))
        for i in rest:
            outcome[i] = "duplicate"
        outcome[first] = _decode_outcome(plan[first], min_side, max_aspect, max_pixels)
    assert all(o is not None for o in outcome), "a record with no predicted fate"
    per_episode = Counter(episode[i] for i in range(n) if outcome[i] == "image")
    rejects = Counter(o for o in outcome if o != "image")
    counts = {
        "records_in": n,
        "images": sum(per_episode.values()),
        "rejected": sum(rejects.values()),
        "rejects": dict(sorted(rejects.items())),
        "unique_images": len({digests[i] for i in range(n) if outcome[i] == "image"}),
        "episodes": len(per_episode),
        "candidate_pairs": sum(k * (k - 1) // 2 for k in per_episode.values()),
    }
    hot_id = episode_of[HOT_PAGE]
    hot_outcomes = Counter(outcome[i] for i in by_page[HOT_PAGE])
    hot = {
        "episode_id": hot_id,
        "records": len(by_page[HOT_PAGE]),
        "distinct_urls": len({image_ids[i] for i in by_page[HOT_PAGE]}),
        "images": hot_outcomes["image"],
        "capped": hot_outcomes["capped"],
        "duplicate": hot_outcomes["duplicate"],
    }
    return Prediction([str(o) for o in outcome], episode, counts, hot)


def _decode_outcome(record: Planned, min_side: int, max_aspect: float, max_pixels: int) -> str:
    if record.kind == "html":
        return "decode_error"
    # Sizes are checked from the header, before any pixel is decoded.
    width, height = record.width, record.height
    short, long = min(width, height), max(width, height)
    if width * height > max_pixels:
        return "too_large"
    if short < min_side:
        return "too_small"
    if long > max_aspect * short:
        return "bad_aspect"
    return "decode_error" if record.kind == "truncated" else "image"


# --------------------------------------------------------------------------- building


class TreeMemory(threading.Thread):
    """Samples the summed RSS of a process and all its descendants (Linux /proc)."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_bytes, self.peak_processes = 0, 0
        self.stopped = threading.Event()
        self.page = os.sysconf("SC_PAGE_SIZE")

    def run(self) -> None:
        while not self.stopped.is_set():
            total, count = self.sample()
            if total > self.peak_bytes:
                self.peak_bytes = total
            self.peak_processes = max(self.peak_processes, count)
            self.stopped.wait(self.interval)

    def sample(self) -> tuple[int, int]:
        children: dict[int, list[int]] = defaultdict(list)
        try:
            entries = os.listdir("/proc")
        except OSError:
            return 0, 0
        for entry in entries:
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    stat = handle.read()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
            children[ppid].append(int(entry))
        total, count, todo = 0, 0, [self.pid]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/statm", "rb") as handle:
                    total += int(handle.read().split()[1]) * self.page
                count += 1
            except OSError:
                continue
            todo.extend(children.get(pid, ()))
        return total, count


def run_build(
    files,
    out: Path,
    extra: list[str],
    log: Path,
    env: dict | None = None,
    cwd: Path | None = None,
    interval: float = 0.25,
) -> dict:
    """Run `pairmill build` (tiny encoder, CPU) on `files` as a child process, with `env`
    and working directory `cwd` if given; wall time, memory and exit status."""
    command = [
        sys.executable,
        "-m",
        "pairmill.cli",
        "build",
        *(str(f) for f in files),
        *("--out", str(out), "--encoder", "tiny", "--device", "cpu"),
        *("--quiet", "--overwrite", *extra),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with log.open("wb") as handle:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        memory = TreeMemory(child.pid, interval=interval)
        memory.start()
        returncode = child.wait()
        seconds = time.perf_counter() - started
    memory.stopped.set()
    memory.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return {
        "command": command,
        "returncode": returncode,
        "wall_s": seconds,
        "peak_tree_rss": memory.peak_bytes,
        "peak_processes": memory.peak_processes,
        # The largest single process (build or, with multi_processing, a worker); only
        # trusted when larger than what the generator's own workers used before.
        "max_process_rss": after * 1024 if after > before else None,
    }


# --------------------------------------------------------------------------- checking


@dataclass
class RunTables:
    """What the run's images and rejects tables say, keyed like the plan.

    Args:
      outcome: (file index, row) -> "image@<episode id>" or the reject reason.
      repeats: keys seen more than once (each record must end in exactly one row).
      images_per_episode: accepted images per episode id.
      rejects_per_episode: (episode id, reason) -> rejected records.
    """

    outcome: dict
    repeats: Counter
    images_per_episode: Counter
    rejects_per_episode: Counter


def read_tables(out: Path, manifest: dict, files: list[Path]) -> RunTables:
    """Read only the key columns of the images and rejects tables."""
    import pyarrow.parquet as pq

    index_of = {f.name: i for i, f in enumerate(files)}
    tables = RunTables({}, Counter(), Counter(), Counter())
    columns = {
        "images": ["source", "row", "episode_id"],
        "rejects": ["source", "row", "episode_id", "reason"],
    }
    for table, names in columns.items():
        for shard in manifest["tables"][table]["shards"]:
            if shard["rows"] == 0:
                continue
            data = pq.read_table(out / shard["path"], columns=names).to_pydict()
            episodes = data["episode_id"]
            if table == "images":
                labels = [f"image@{e}" for e in episodes]
                tables.images_per_episode.update(episodes)
            else:
                labels = data["reason"]
                tables.rejects_per_episode.update(zip(episodes, labels, strict=True))
            for source, row, label in zip(data["source"], data["row"], labels, strict=True):
                key = (index_of.get(Path(source).name, -1), row)
                if key in tables.outcome:
                    tables.repeats[key] += 1
                tables.outcome[key] = label
    return tables


def check(crawl: Crawl, out: Path, manifest: dict) -> tuple[list[dict], Prediction]:
    """Every check: name, ok, detail."""
    config = manifest.get("config", {})
    counts = manifest["counts"]
    prediction = predict(crawl, config)
    expected = prediction.counts
    cap = int(config.get("max_images_per_episode", 64))
    checks: list[dict] = []

    def add(name: str, ok: bool, detail: str = "") -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    add("reconciled", manifest.get("reconciled") is True, "records_in == images + rejected")
    add(
        "records_in == generated",
        counts["records_in"] == len(crawl.plan),
        f"{counts['records_in']:,} vs {len(crawl.plan):,}",
    )
    for key in ("images", "unique_images", "episodes", "candidate_pairs"):
        add(
            f"{key} as predicted",
            counts[key] == expected[key],
            f"{counts[key]:,} vs {expected[key]:,}",
        )
    got, want = counts["rejects"], expected["rejects"]
    wrong = {r: (got.get(r, 0), want.get(r, 0)) for r in sorted(set(got) | set(want))}
    wrong = {r: pair for r, pair in wrong.items() if pair[0] != pair[1]}
    add(
        "rejects by reason as predicted",
        not wrong,
        ", ".join(f"{r}: {a:,} vs {b:,}" for r, (a, b) in wrong.items()) or f"{len(want)} reasons",
    )
    planted = [*PLANTED_REASONS, *(["boilerplate"] if "boilerplate" in want else [])]
    missing = [r for r in planted if not got.get(r)]
    add("every planted reason appears", not missing, ", ".join(missing) or ", ".join(planted))
    kept, candidates = counts["kept_pairs"], counts["candidate_pairs"]
    add("0 < kept_pairs <= candidate_pairs", 0 < kept <= candidates, f"{kept:,} of {candidates:,}")
    rows = {
        "pairs": kept,
        "images": counts["images"],
        "similarities": candidates,
        "rejects": counts["rejected"],
    }
    tables = manifest["tables"]
    off = {t: (tables[t]["rows"], n) for t, n in rows.items() if tables[t]["rows"] != n}
    add(
        "table rows match counts",
        not off,
        ", ".join(f"{t}: {a:,} rows vs {b:,}" for t, (a, b) in off.items()) or "4 tables",
    )

    run = read_tables(out, manifest, crawl.files)
    add(*_record_check(crawl, prediction, run))
    hot, eid = prediction.hot, prediction.hot["episode_id"]
    images = run.images_per_episode[eid]
    capped, duplicate = (
        run.rejects_per_episode[(eid, "capped")],
        run.rejects_per_episode[(eid, "duplicate")],
    )
    add(
        f"hot page: images == min(cap, distinct URLs) <= {cap}",
        images == min(cap, hot["distinct_urls"]) == hot["images"],
        f"{images} images of {hot['distinct_urls']:,} distinct URLs",
    )
    add(
        "hot page: capped as predicted",
        capped == hot["capped"] and capped + duplicate + images == hot["records"],
        f"{capped:,} capped + {duplicate:,} URL duplicates + {images} images = "
        f"{hot['records']:,} records (predicted {hot['capped']:,} capped)",
    )
    biggest = max(run.images_per_episode.values(), default=0)
    add("no episode over the cap", biggest <= cap, f"largest episode: {biggest} images")
    return checks, prediction


def _record_check(crawl: Crawl, prediction: Prediction, run: RunTables) -> tuple[str, bool, str]:
    """Each record in exactly one row, with the predicted outcome (and episode, if accepted)."""
    got = dict(run.outcome)
    mismatches: Counter = Counter()
    examples: dict = {}
    for i, key in enumerate(crawl.keys):
        want = prediction.outcome[i]
        if want == "image":
            want = f"image@{prediction.episode[i]}"
        have = got.pop(key, "missing")
        if have != want:
            pair = (_short(want), _short(have))
            mismatches[pair] += 1
            examples.setdefault(pair, (key, crawl.plan[i].kind, crawl.plan[i].image_url))
    ok = not (mismatches or run.repeats or got)
    if ok:
        return "every record's fate as predicted", True, f"{len(crawl.keys):,} records"
    parts = []
    for (want, have), n in mismatches.most_common(6):
        (file_index, row), kind, url = examples[(want, have)]
        parts.append(f"{n:,} {want} but {have} (e.g. file {file_index} row {row}: {kind} {url})")
    if run.repeats:
        parts.append(f"{sum(run.repeats.values()):,} records in two rows")
    if got:
        parts.append(f"{len(got):,} rows of unknown records")
    return "every record's fate as predicted", False, "; ".join(parts)


def _short(label: str) -> str:
    return f"image@{label[6:14]}" if label.startswith("image@") else label


# --------------------------------------------------------------------------- main


def split_passthrough(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(this script's flags, what follows ``--``: flags for `pairmill build`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv, passthrough = split_passthrough(argv)
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other flags are passed to `pairmill build`.",
        allow_abbrev=False,
    )
    p.add_argument("--records", type=int, default=200_000, help="crawl records (>= 2000)")
    p.add_argument("--workdir", help="keep the crawl here between runs (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the run (and a temp workdir)")
    p.add_argument("--crawl-seed", type=int, default=0)
    p.add_argument(
        "--gen-workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="processes generating the crawl",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args, unknown = p.parse_known_args(argv)
    if args.records < MIN_RECORDS:
        p.error(f"--records must be at least {MIN_RECORDS}")
    return args, unknown + passthrough


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    temporary = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pairmill-stress-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "run"
    try:
        crawl = generate(workdir, args.records, args.crawl_seed, args.gen_workers)
        crawl_bytes = sum(f.stat().st_size for f in crawl.files)
        build = run_build(crawl.files, out, extra, workdir / "build.log")
        if build["returncode"] != 0:
            tail = (workdir / "build.log").read_text(errors="replace")[-4000:]
            print(tail, file=sys.stderr)
            print(f"FAIL: pairmill build exited {build['returncode']}", file=sys.stderr)
            return 1
        manifest = json.loads((out / "manifest.json").read_text())
        checks, prediction = check(crawl, out, manifest)
    finally:
        if not args.keep:
            shutil.rmtree(workdir if temporary else out, ignore_errors=True)
    report = _report(args, extra, crawl, crawl_bytes, build, manifest, checks, prediction)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
        if args.keep or not temporary:
            print(f"workdir: {workdir}" + (" (run kept in run/)" if args.keep else ""))
    return 0 if report["passed"] else 1


def _report(args, extra, crawl, crawl_bytes, build, manifest, checks, prediction) -> dict:
    gib = 2**30
    counts = manifest["counts"]
    return {
        "records": len(crawl.plan),
        "crawl_files": len(crawl.files),
        "crawl_mib": round(crawl_bytes / 2**20, 1),
        "generate_s": round(crawl.seconds, 2) if crawl.seconds else None,
        "extra_args": extra,
        "wall_s": round(build["wall_s"], 2),
        "pipeline_s": manifest["timing"]["seconds"],
        "records_per_s": round(len(crawl.plan) / build["wall_s"], 1),
        # Sampled every 0.25 s, the tree's sum can miss a short peak that the kernel's
        # own high-water mark of the largest process caught: report the larger.
        "peak_rss_gib": round(max(build["peak_tree_rss"], build["max_process_rss"] or 0) / gib, 3),
        "peak_processes": build["peak_processes"],
        "max_process_rss_gib": (
            round(build["max_process_rss"] / gib, 3) if build["max_process_rss"] else None
        ),
        "cpu_count": os.cpu_count(),
        "output_mib": {
            table: round(info["bytes"] / 2**20, 1) for table, info in manifest["tables"].items()
        },
        "counts": counts,
        "predicted": prediction.counts,
        "hot_page": prediction.hot,
        "checks": checks,
        "passed": all(c["ok"] for c in checks),
    }


def _print_table(report: dict) -> None:
    counts = report["counts"]
    generated = f"generated in {report['generate_s']} s" if report["generate_s"] else "reused crawl"
    print(
        f"stress crawl: {report['records']:,} records in {report['crawl_files']} Parquet files "
        f"({report['crawl_mib']} MiB, {generated}); tiny encoder, cpu"
        + (f"; build flags: {' '.join(report['extra_args'])}" if report["extra_args"] else "")
    )
    rows = [
        ("records", f"{report['records']:,}"),
        ("wall s (whole process)", f"{report['wall_s']:.1f}"),
        ("pipeline s (manifest)", f"{report['pipeline_s']:.1f}"),
        ("records/s", f"{report['records_per_s']:,.1f}"),
        (
            "peak RSS GiB (process tree)",
            f"{report['peak_rss_gib']:.2f}  ({report['peak_processes']} processes)",
        ),
        ("images", f"{counts['images']:,}"),
        ("unique images", f"{counts['unique_images']:,}"),
        ("episodes", f"{counts['episodes']:,}"),
        ("candidate pairs", f"{counts['candidate_pairs']:,}"),
        ("kept pairs", f"{counts['kept_pairs']:,}"),
        (
            "output MiB",
            "  ".join(f"{table} {mib:,.1f}" for table, mib in report["output_mib"].items()),
        ),
    ]
    rows += [(f"  rejected: {r}", f"{n:,}") for r, n in counts["rejects"].items()]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>14}")
    print()
    for c in report["checks"]:
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail']}")
    print("\nPASS" if report["passed"] else "\nFAIL")


if __name__ == "__main__":
    sys.exit(main())
