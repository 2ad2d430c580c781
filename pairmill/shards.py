"""Shard writers (a registry, one interface) and shard planning.

A table's rows are spread over `num_shards` by a hash of their id (the pairs
table's by a hash of their episode id: an episode's pairs share a shard), each
shard sorted by id, so the same rows always give the same files. Writers return a
`ShardInfo` (rows, bytes, sha256) computed while writing: the driver never
re-reads shards to describe them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from schemas import Schema

_WRITERS: dict[str, type[ShardWriter]] = {}

# Target bytes of one Parquet row group: small enough for readers to split
# shards across workers, large enough for efficient column chunks.
ROW_GROUP_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ShardInfo:
    """What was written to one shard.

    Args:
      table: pairs, images, similarities or rejects.
      path: the shard's path relative to the run directory.
      rows: number of rows.
      bytes: file size.
      sha256: hex SHA-256 of the file.
      schema: the schema id (``pair_v1``…).
      format: the file format.
    """

    table: str
    path: str
    rows: int
    bytes: int
    sha256: str
    schema: str
    format: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ShardWriter(Protocol):
    """Turns rows into the bytes of one shard.

    Writers are built as ``cls(**options)`` (e.g. ``compression="gzip"``) and expose
    the file extension their options imply.
    """

    format: str

    @property
    def extension(self) -> str: ...

    def encode(self, rows: list[dict[str, Any]], schema: Schema) -> bytes:
        """Serialise rows (already in their final order) into one shard's bytes."""


# Writers living in modules with optional dependencies register when first asked for.
_LAZY_WRITERS = {"tfrecord": "pairmill.tfrecord"}


def register_writer(cls: type[ShardWriter]) -> type[ShardWriter]:
    """Class decorator: make a writer available under its `format` name."""
    _WRITERS[cls.format] = cls
    return cls


def get_writer(fmt: str, **options: Any) -> ShardWriter:
    """The writer for a format, built with its options."""
    if fmt not in _WRITERS and fmt in _LAZY_WRITERS:
        import importlib

        importlib.import_module(_LAZY_WRITERS[fmt])
    try:
        cls = _WRITERS[fmt]
    except KeyError:
        raise KeyError(
            f"no shard writer for {fmt!r}; known: {', '.join(writer_formats())}"
        ) from None
    return cls(**options)


def writer_formats() -> list[str]:
    return sorted(set(_WRITERS) | set(_LAZY_WRITERS))


@register_writer
class ParquetWriter:
    """Parquet shards: zstd for ids and numbers, no compression for image bytes."""

    format = "parquet"
    extension = ".parquet"

    def __init__(self, **options: Any):
        if options:
            raise ValueError(f"parquet shards take no options, got {sorted(options)}")

    def encode(self, rows: list[dict[str, Any]], schema: Schema) -> bytes:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows, schema=schema.arrow())
        binary = [f.name for f in schema.fields if f.type == "binary"]
        # Images are already compressed; compressing them again only costs time.
        compression = {f.name: ("NONE" if f.name in binary else "ZSTD") for f in schema.fields}
        row_bytes = max(1, table.nbytes // max(1, table.num_rows))
        sink = pa.BufferOutputStream()
        pq.write_table(
            table,
            sink,
            compression=compression,
            use_dictionary=[f.name for f in schema.fields if f.type in ("string", "bool")],
            row_group_size=max(1, ROW_GROUP_BYTES // row_bytes),
            write_statistics=[f.name for f in schema.fields if f.type not in ("binary",)],
        )
        del table  # free the Arrow copy of the rows before copying the file out of Arrow
        return sink.getvalue().to_pybytes()


def shard_count(rows: int, total_bytes: int, shard_rows: int | None, shard_size_mb: float) -> int:
    """How many shards a table of `rows` rows and about `total_bytes` bytes gets."""
    if rows <= 0:
        return 1
    by_size = math.ceil(total_bytes / (shard_size_mb * 2**20))
    by_rows = math.ceil(rows / shard_rows) if shard_rows else 1
    return max(1, by_size, by_rows)


def shard_index(row_id: str, num_shards: int) -> int:
    """The shard of a row: a hash of its id, so assignment is stable and balanced."""
    return int(hashlib.blake2b(row_id.encode(), digest_size=8).hexdigest(), 16) % num_shards


def shard_name(table: str, index: int, total: int, extension: str) -> str:
    return f"{table}/{table}-{index:05d}-of-{total:05d}{extension}"


def row_size(row: dict[str, Any]) -> int:
    """A cheap estimate of a row's encoded size, for shard planning."""
    return sum(_value_size(value) for value in row.values())


def _value_size(value: Any) -> int:
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, list):
        return 4 * len(value)
    return 8


# Pair shards are written per episode: an episode's image rows (each image once) and its
# kept candidates travel together to the shard of the episode, whose writer builds the pair
# rows there. A pair row (`rows.pair_row`) copies most of its bytes from its two image rows,
# so each image's share of `row_size(pair row)` is measured once, from the image row, and a
# pair's size is summed from its two sides' shares: the plan needs no pair row.


def pair_side_sizes(image: dict[str, Any]) -> tuple[int, int]:
    """(bytes a pair row copies from this image row on either side, bytes more on the cond
    side), as `row_size` of the pair row counts them."""
    from pairmill.rows import SIDE_FIELDS

    side = sum(_value_size(image[name]) for name in SIDE_FIELDS)
    cond_extra = _value_size(image["page_url"])
    if "tokens" in image:  # <side>_tokens, and token_count / token_dim from the cond side
        side += _value_size(image["tokens"])
        cond_extra += _value_size(image["token_count"]) + _value_size(image["token_dim"])
    return side, cond_extra


def pair_row_size(candidate, cond: tuple[int, int], target: tuple[int, int], encoder: str) -> int:
    """`row_size(rows.pair_row(candidate, ...))` from the two sides' `pair_side_sizes`."""
    own = (candidate.pair_id, candidate.episode_id, candidate.similarity, encoder)
    return sum(_value_size(v) for v in own) + cond[0] + cond[1] + target[0]


def episode_pair_plan(
    sizes: Iterable[tuple[str, tuple[int, int]]], candidates: Iterable, encoder: str
) -> tuple[int, int]:
    """(kept pairs, their estimated bytes) of one episode, from (image_id, side sizes)."""
    by_id = dict(sizes)
    count = total = 0
    for candidate in candidates:
        count += 1
        total += pair_row_size(
            candidate, by_id[candidate.cond_image_id], by_id[candidate.target_image_id], encoder
        )
    return count, total


def episode_pair_group(
    images: Iterable[dict[str, Any]], candidates: Iterable
) -> tuple[list[dict[str, Any]], list] | None:
    """What an episode sends to its pair shard: the image rows in its kept pairs (each once)
    and the kept candidates; None when it kept no pair."""
    candidates = list(candidates)
    if not candidates:
        return None
    used = {c.cond_image_id for c in candidates} | {c.target_image_id for c in candidates}
    return [row for row in images if row["image_id"] in used], candidates


def episode_pair_rows(
    images: Iterable[dict[str, Any]], candidates: Iterable, encoder: str
) -> list[dict[str, Any]]:
    """The self-contained pair rows of one episode group (`episode_pair_group`)."""
    from pairmill.rows import pair_row

    by_id = {row["image_id"]: row for row in images}
    return [
        pair_row(c, by_id[c.cond_image_id], by_id[c.target_image_id], encoder) for c in candidates
    ]


def write_bytes(url: str, data: bytes) -> None:
    """Write a file through fsspec; locally via a temporary name, then an atomic rename."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        tmp = f"{path}.inprogress"
        with fs.open(tmp, "wb") as handle:
            handle.write(data)
        fs.mv(tmp, path)
    else:  # object stores make a file visible only once it is complete
        with fs.open(path, "wb") as handle:
            handle.write(data)


def write_shard(
    out: str,
    table: str,
    index: int,
    total: int,
    rows: list[dict[str, Any]],
    schema: Schema,
    fmt: str,
    options: dict[str, Any] | None = None,
) -> ShardInfo:
    """Encode rows with the format's writer and store them as one shard of `table`."""
    writer = get_writer(fmt, **(options or {}))
    data = writer.encode(rows, schema)
    relative = shard_name(table, index, total, writer.extension)
    write_bytes(f"{out.rstrip('/')}/{relative}", data)
    return ShardInfo(
        table=table,
        path=relative,
        rows=len(rows),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        schema=schema.id,
        format=fmt,
    )
