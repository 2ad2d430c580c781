"""Building output rows (images, pairs) and the run's internal report file."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pairmill.records import CrawlRecord, extra_json


def token_fields(tokens) -> dict[str, Any]:
    """The image row's token columns from a float16 (T, W) array (schema ``image_v2``)."""
    import numpy as np

    array = np.ascontiguousarray(tokens, dtype="<f2")
    count, dim = array.shape
    return {"tokens": array.tobytes(), "token_count": count, "token_dim": dim}


def image_row(
    record: CrawlRecord,
    decoded,
    embedding: list[float],
    sha256: str | None = None,
    tokens: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The images-table row of an accepted record (schema ``image_v1``, or ``image_v2``
    with the `token_fields` of its patch tokens).

    `sha256` of the stored bytes may be given when one content serves several records.
    """
    row = {
        "image_id": record.image_id,
        "episode_id": record.episode_id,
        "page_url": record.canonical_page_url,
        "source_page_url": record.page_url,
        "url": record.image_url,
        "sha256": sha256 or hashlib.sha256(decoded.data).hexdigest(),
        "format": decoded.format,
        "width": decoded.width,
        "height": decoded.height,
        "source_width": decoded.source_width,
        "source_height": decoded.source_height,
        "image": decoded.data,
        "embedding": embedding,
        "extra": extra_json(record.extra),
        "source": record.source,
        "row": record.row,
    }
    if tokens is not None:
        row.update(tokens)
    return row


# The image-row fields each side of a pair row copies, as cond_<name> / target_<name>.
SIDE_FIELDS = ("image_id", "url", "sha256", "width", "height", "image", "embedding")


def pair_row(candidate, cond: dict[str, Any], target: dict[str, Any], encoder: str) -> dict:
    """A self-contained pair row from a kept candidate and two image rows: schema
    ``pair_v1``, or ``pair_v2`` when the image rows carry patch tokens (``image_v2``)."""
    row: dict[str, Any] = {
        "pair_id": candidate.pair_id,
        "episode_id": candidate.episode_id,
        "page_url": cond["page_url"],
    }
    for prefix, image in (("cond", cond), ("target", target)):
        for name in SIDE_FIELDS:
            row[f"{prefix}_{name}"] = image[name]
    row["similarity"] = candidate.similarity
    row["encoder"] = encoder
    if "tokens" in cond:
        row["cond_tokens"], row["target_tokens"] = cond["tokens"], target["tokens"]
        row["token_count"], row["token_dim"] = cond["token_count"], cond["token_dim"]
    return row


REPORT_NAME = "_report.json"


def table_splits(url: str) -> list[tuple[str, int]]:
    """(file, row group) pieces of one Parquet shard."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as handle:
        groups = pq.ParquetFile(handle).metadata.num_row_groups
    return [(url, group) for group in range(groups)]


def read_table_split(split: tuple[str, int]):
    """The rows of one Parquet row group, as dicts."""
    import fsspec
    import pyarrow.parquet as pq

    url, group = split
    with fsspec.open(url, "rb") as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=256, row_groups=[group]):
            yield from batch.to_pylist()


def write_report(url: str, items: list[tuple[str, Any]]) -> str:
    """Write shard infos and counts as one JSON object (the driver reads it)."""
    from pairmill.shards import write_bytes

    report = {
        "shards": sorted(
            (value for kind, value in items if kind == "shard"), key=lambda s: s["path"]
        ),
        "counts": dict(sorted(value for kind, value in items if kind == "count")),
        "lists": dict(sorted(value for kind, value in items if kind == "list")),
    }
    write_bytes(url, json.dumps(report, indent=1).encode())
    return url
