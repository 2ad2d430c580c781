"""A sample crawl made from real photographs that scikit-image and scikit-learn ship.

Used by `pairmill demo`, the tests and the benchmarks. Each "page" shows
variants (crops, flips, scales, colour shifts) of a few photos, so pages have
related and unrelated images; `with_bad_records` adds the nasty cases a real
crawl has (duplicates, truncated files, HTML served as an image, tiny icons,
missing fields, tracking-parameter variants of a page URL).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from pairmill.errors import require

COLOUR_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "cat",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
)
GREY_PHOTOS = ("camera", "coins", "moon", "clock", "brick", "grass", "gravel", "cell", "page")


def real_photos() -> list[tuple[str, np.ndarray]]:
    """(name, uint8 HxWx3 RGB) for every bundled photograph, in a fixed order."""
    data = require("skimage.data", "samples")
    photos = []
    for name in COLOUR_PHOTOS + GREY_PHOTOS:
        array = np.asarray(getattr(data, name)())
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        photos.append((name, array[..., :3].astype(np.uint8)))
    datasets = require("sklearn.datasets", "samples")
    for name, array in zip(("china", "flower"), datasets.load_sample_images().images, strict=False):
        photos.append((name, np.asarray(array, dtype=np.uint8)))
    return photos


def variant(photo: np.ndarray, rng: np.random.Generator, min_side: int = 96, max_side: int = 320):
    """A random crop of 40-100 % of a photo, maybe flipped, rescaled and colour-shifted."""
    from PIL import Image, ImageEnhance

    height, width = photo.shape[:2]
    scale = float(np.sqrt(rng.uniform(0.4, 1.0)))
    ch, cw = max(8, int(height * scale)), max(8, int(width * scale))
    top, left = int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))
    image = Image.fromarray(photo[top : top + ch, left : left + cw])
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = int(rng.integers(min_side, max_side + 1))
    factor = side / min(image.size)
    image = image.resize(
        (max(1, round(image.width * factor)), max(1, round(image.height * factor))),
        Image.Resampling.BICUBIC,
    )
    image = ImageEnhance.Color(image).enhance(float(rng.uniform(0.7, 1.3)))
    return ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.85, 1.15)))


def jpeg_bytes(image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_sample_crawl(
    directory: str | Path,
    pages: int = 12,
    images_per_page: int = 8,
    seed: int = 0,
    with_bad_records: bool = True,
) -> Path:
    """Write `crawl.parquet` (inline bytes and a few image_path files) under `directory`.

    Returns the crawl file's path. Deterministic for a given seed.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    (directory / "files").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = real_photos()
    rows: list[dict] = []
    for page in range(pages):
        page_url = f"https://photos.example.org/gallery/{page}?lang=en"
        # Each page is about two or three subjects, as a web page usually is.
        subjects = rng.choice(len(photos), size=int(rng.integers(2, 4)), replace=False)
        for k in range(images_per_page):
            name, photo = photos[int(subjects[k % len(subjects)])]
            data = jpeg_bytes(variant(photo, rng))
            row = _row(page_url, f"https://cdn.example.org/{page}/{name}-{k}.jpg", data)
            if k == 1:  # some crawls point at files instead of carrying bytes
                path = directory / "files" / f"{page}-{k}.jpg"
                path.write_bytes(data)
                row["image"], row["image_path"] = None, f"files/{path.name}"
            rows.append(row)
    if with_bad_records:
        rows.extend(_bad_records(rows, photos, rng))
    table = pa.Table.from_pylist(rows, schema=_schema())
    target = directory / "crawl.parquet"
    pq.write_table(table, target, row_group_size=64)
    return target


def _row(page_url: str, image_url: str, data: bytes | None, alt: str | None = None) -> dict:
    return {
        "page_url": page_url,
        "image_url": image_url,
        "image": data,
        "image_path": None,
        "alt": alt or image_url.rsplit("/", 1)[-1],
    }


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("page_url", pa.string()),
            ("image_url", pa.string()),
            ("image", pa.binary()),
            ("image_path", pa.string()),
            ("alt", pa.string()),
        ]
    )


def _bad_records(rows: list[dict], photos, rng: np.random.Generator) -> list[dict]:
    from PIL import Image

    first = rows[0]
    page = first["page_url"]
    # The same page as page 0, written differently: one episode after canonicalisation.
    tracked = "HTTPS://Photos.Example.ORG:443/gallery/0?utm_source=feed&lang=en#top"
    good = jpeg_bytes(variant(photos[0][1], rng))
    icon = jpeg_bytes(Image.new("RGB", (16, 16), (200, 30, 30)))
    panorama = jpeg_bytes(Image.fromarray(photos[1][1]).resize((600, 100)))
    return [
        _row(page, first["image_url"], first["image"], "same URL again"),
        _row(tracked, "https://cdn.example.org/0/copy.jpg", first["image"], "same bytes, new URL"),
        _row(tracked, "https://cdn.example.org/0/extra.jpg", good, "tracking variant of page 0"),
        _row(page, "https://cdn.example.org/0/broken.jpg", good[: len(good) // 2], "truncated"),
        _row(page, "https://cdn.example.org/0/page.jpg", b"<html><body>404</body></html>", "html"),
        _row(page, "https://cdn.example.org/0/icon.jpg", icon, "tiny icon"),
        _row(page, "https://cdn.example.org/0/banner.jpg", panorama, "banner"),
        _row(page, "https://cdn.example.org/0/empty.jpg", b"", "empty"),
        # No bytes, and a URL naming a local file: never read, rejected as disallowed_url
        # (a URL-only record with an http(s) URL would be fetched).
        _row(page, "file:///etc/passwd", None, "local file as image URL"),
        _row("", "https://cdn.example.org/x.jpg", good, "no page"),
    ]
