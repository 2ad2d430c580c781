"""Reading pair shards back for training: plain dicts (`read_pairs`) and a PyTorch dataset.

Both read Parquet or TFRecord pair shards from local paths, directories (a run directory,
resolved through its manifest, or its ``pairs/`` directory), globs or fsspec URLs
(``gs://`` needs gcsfs). The unit of work is a Parquet row group or a whole TFRecord file,
so a shard can be split across readers without reading anything twice.

Rows are dicts keyed by the pair schema's column names. Embeddings come back as float32
arrays (numpy from `read_pairs`, torch from `PairShards`) rather than lists of Python
floats, which would cost more than reading the file; image bytes stay bytes unless decoded.
Shards built with ``--store-tokens`` (``pair_v2``) also give ``cond_tokens`` and
``target_tokens`` as float16 arrays of shape (token_count, token_dim).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pairmill.errors import InputError, MissingDependencyError

try:  # PairShards is a torch dataset; read_pairs works without torch
    import torch
    from torch.utils.data import IterableDataset as _DatasetBase
except ImportError:  # pragma: no cover - depends on the environment
    torch = None
    _DatasetBase = object

PARQUET = "parquet"
TFRECORD = "tfrecord"
# Longest suffix first: ".tfrecord.gz" must not be read as an unknown ".gz".
_SUFFIXES = ((".tfrecord.gz", TFRECORD), (".tfrecord", TFRECORD), (".parquet", PARQUET))
IMAGE_FIELDS = ("cond_image", "target_image")
EMBEDDING_FIELDS = ("cond_embedding", "target_embedding")
# pair_v2 (build --store-tokens): float16 patch tokens per side and their shape.
TOKEN_FIELDS = ("cond_tokens", "target_tokens")
TOKEN_SHAPE_FIELDS = ("token_count", "token_dim")
_MANIFEST = "manifest.json"
Urls = str | os.PathLike | Sequence[str | os.PathLike]
_GLOB_CHARS = frozenset("*?[")
# fsspec protocol -> the package that implements it, for the install hint.
_FS_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs", "az": "adlfs"}
_FS_PACKAGES |= {"abfs": "adlfs", "abfss": "adlfs", "hf": "huggingface_hub"}


@dataclass(frozen=True)
class WorkUnit:
    """One independently readable piece of a shard.

    Args:
      url: the shard (local path or fsspec URL).
      format: ``parquet`` or ``tfrecord``.
      row_group: the Parquet row group; None for a TFRecord file, read whole.
    """

    url: str
    format: str
    row_group: int | None = None


# ---------------------------------------------------------------------------------------------
# Finding shards


def list_shards(urls: Urls) -> list[tuple[str, str]]:
    """Resolve paths, directories, globs and fsspec URLs to ``(url, format)`` pair shards.

    A run directory (or its ``pairs/`` directory) resolves through the run's manifest, so
    stray files never sneak in; other directories list their shard files. The order is
    deterministic: each argument's shards sorted, arguments in the order given.

    Raises:
      InputError: an argument matches no pair shard.
      MissingDependencyError: a URL's filesystem (gcsfs, s3fs...) is not installed.
    """
    shards: dict[str, str] = {}
    for url in [urls] if isinstance(urls, (str, os.PathLike)) else list(urls):
        found = _resolve(os.fspath(url))
        if not found:
            raise InputError(f"no pair shards found at {url}")
        for shard in found:
            shards.setdefault(*shard)
    if not shards:
        raise InputError("no pair shards given")
    return list(shards.items())


def shard_format(url: str) -> str | None:
    """The shard format a file name implies, or None for anything else."""
    name = url.lower()
    return next((fmt for suffix, fmt in _SUFFIXES if name.endswith(suffix)), None)


def _resolve(url: str) -> list[tuple[str, str]]:
    fs, paths = _expand(url)
    if len(paths) == 1 and fs.isdir(paths[0]):
        return _directory_shards(fs, paths[0])
    found = []
    for path in sorted(p for p in paths if fs.isfile(p)):
        fmt = shard_format(path)
        if fmt is None:
            raise InputError(f"{path} is not a pair shard (.parquet, .tfrecord or .tfrecord.gz)")
        found.append((_full_url(fs, path), fmt))
    return found


def _expand(url: str):
    """The filesystem and the paths a URL names (globs expanded), with an install hint."""
    import fsspec

    try:
        if _GLOB_CHARS & set(url):
            fs, _, paths = fsspec.get_fs_token_paths(url)
            return fs, paths
        fs, path = fsspec.core.url_to_fs(url)
        return fs, [path] if fs.exists(path) else []
    except ImportError as exc:
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        package = _FS_PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise MissingDependencyError(
            f"reading {url} needs {package}: pip install {package}"
        ) from exc


def _directory_shards(fs, path: str) -> list[tuple[str, str]]:
    path = path.rstrip("/")
    for run_dir in (path, path.rsplit("/", 1)[0] if path.endswith("/pairs") else None):
        if run_dir and fs.exists(f"{run_dir}/{_MANIFEST}"):
            return _manifest_shards(fs, run_dir)
    names = sorted(p for p in fs.ls(path, detail=False) if shard_format(p))
    return [(_full_url(fs, p), shard_format(p)) for p in names]


def _manifest_shards(fs, run_dir: str) -> list[tuple[str, str]]:
    with fs.open(f"{run_dir}/{_MANIFEST}", "rb") as handle:
        pairs = json.loads(handle.read())["tables"]["pairs"]
    shards = sorted(pairs["shards"], key=lambda s: s["path"])
    # Empty shards exist so that every table has a file; they hold no rows to read.
    return [(_full_url(fs, f"{run_dir}/{s['path']}"), pairs["format"]) for s in shards if s["rows"]]


def _full_url(fs, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool({"file", "local"} & set(protocols))


def list_units(urls: Urls) -> list[WorkUnit]:
    """The work units of the shards `urls` names, in a deterministic order.

    Parquet shards contribute one unit per non-empty row group (read from each footer, in
    parallel since remote footers cost a round trip each); TFRecord shards one unit each.
    """
    shards = list_shards(urls)
    with ThreadPoolExecutor(max_workers=min(16, len(shards))) as pool:
        per_shard = list(pool.map(_shard_units, shards))
    return [unit for units in per_shard for unit in units]


def _shard_units(shard: tuple[str, str]) -> list[WorkUnit]:
    url, fmt = shard
    if fmt != PARQUET:
        return [WorkUnit(url, fmt)]
    with _open_parquet(url) as parquet:
        meta = parquet.metadata
        return [
            WorkUnit(url, fmt, group)
            for group in range(meta.num_row_groups)
            if meta.row_group(group).num_rows
        ]


# ---------------------------------------------------------------------------------------------
# Reading rows


def read_pairs(
    urls: Urls,
    columns: Sequence[str] | None = None,
    decode: bool = False,
    image_size: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Iterate over the pair rows of shards as plain dicts (no torch needed).

    Args:
      urls: a path, directory (run or ``pairs/``), glob or fsspec URL, or a list of them.
      columns: read only these columns (pushed down into the Parquet reader).
      decode: decode ``cond_image``/``target_image`` to uint8 HxWx3 RGB numpy arrays
        (EXIF orientation applied); otherwise they stay bytes.
      image_size: with `decode`, resize the shorter side to this (bicubic) and center-crop
        to a square, so that images stack.

    Embeddings are float32 numpy arrays; the other columns are str, int and float.
    """
    for row in read_units(list_units(urls), columns):
        yield decode_row(row, image_size) if decode else row


def read_units(
    units: Sequence[WorkUnit], columns: Sequence[str] | None = None
) -> Iterator[dict[str, Any]]:
    """The rows of `units`, in order, undecoded.

    The next Parquet row group is read in a background thread while the rows of the
    current one are built (pyarrow releases the GIL), so reading and converting overlap.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = [pool.submit(read_unit, units[0], columns)] if units else []
        for index in range(len(units)):
            rows = ahead.pop().result()
            if index + 1 < len(units):
                ahead.append(pool.submit(read_unit, units[index + 1], columns))
            yield from rows


def read_unit(unit: WorkUnit, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of one work unit, undecoded (image bytes, float32 numpy embeddings,
    float16 (token_count, token_dim) numpy tokens for pair_v2 shards).

    A Parquet row group is read now and its rows built as they are iterated; a TFRecord
    file is streamed.
    """
    wanted = columns
    if columns is not None and any(name in columns for name in TOKEN_FIELDS):
        # Tokens are stored flat: their shape columns are needed to give them shape.
        columns = [*columns, *(n for n in TOKEN_SHAPE_FIELDS if n not in columns)]
    if unit.format == PARQUET:
        rows = _table_rows(_read_row_group(unit, columns))
    elif unit.format == TFRECORD:
        rows = _tfrecord_rows(unit, columns)
    else:
        raise InputError(f"{unit.url}: unknown shard format {unit.format!r}")
    return _shaped_tokens(rows, unit.url, wanted)


def _shaped_tokens(
    rows: Iterator[dict[str, Any]], url: str, wanted: Sequence[str] | None
) -> Iterator[dict[str, Any]]:
    drop = [] if wanted is None else [n for n in TOKEN_SHAPE_FIELDS if n not in wanted]
    for row in rows:
        if TOKEN_FIELDS[0] in row or TOKEN_FIELDS[1] in row:
            for name in TOKEN_FIELDS:
                if row.get(name) is not None:
                    row[name] = tokens_array(row[name], row["token_count"], row["token_dim"], url)
            for name in drop:
                del row[name]
        yield row


def tokens_array(data: bytes, count: int, dim: int, where: str = "tokens") -> np.ndarray:
    """Stored token bytes -> a writable float16 (count, dim) array.

    Raises:
      InputError: the bytes do not hold count x dim float16 values.
    """
    if len(data) != 2 * count * dim:
        raise InputError(
            f"{where}: tokens hold {len(data)} bytes, not {count} x {dim} float16 values"
        )
    return np.frombuffer(data, dtype="<f2").reshape(count, dim).astype(np.float16)


@contextlib.contextmanager
def _open_parquet(url: str):
    import fsspec
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(url)
    if _is_local(fs):
        # Memory-mapping spares a copy of every page: reading gets about 2x faster.
        with pq.ParquetFile(path, memory_map=True) as parquet:
            yield parquet
    else:
        with fs.open(path, "rb") as handle, pq.ParquetFile(handle) as parquet:
            yield parquet


def _read_row_group(unit: WorkUnit, columns: Sequence[str] | None):
    with _open_parquet(unit.url) as parquet:
        _check_columns(unit.url, parquet.schema_arrow.names, columns)
        return parquet.read_row_group(unit.row_group, columns=columns)


def _table_rows(table) -> Iterator[dict[str, Any]]:
    for batch in table.to_batches():
        yield from _batch_rows(batch)


def _check_columns(url: str, names: Sequence[str], columns: Sequence[str] | None) -> None:
    missing = [c for c in columns or () if c not in names]
    if missing:
        raise InputError(f"{url} has no column {missing[0]!r}; it has {', '.join(names)}")


def _batch_rows(batch) -> Iterator[dict[str, Any]]:
    """Rows of a record batch, converted column by column (pyarrow's row-wise path is 2x
    slower) and lazily, so each row's bytes are made just before it is used."""
    names = batch.schema.names
    for values in zip(*(_column_values(column) for column in batch.columns), strict=True):
        yield dict(zip(names, values, strict=True))


def _column_values(array) -> Iterable[Any]:
    """A column's values in row order, as the lazily made Python values of its rows."""
    import pyarrow as pa

    kind = array.type
    if pa.types.is_list(kind) and pa.types.is_floating(kind.value_type):
        if array.null_count:  # pair columns are not nullable: the simple path is enough
            return [None if v is None else np.asarray(v, np.float32) for v in array.to_pylist()]
        return _float_lists(array)
    if (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)) and not array.null_count:
        return _binary_values(array, large=pa.types.is_large_binary(kind))
    return array.to_pylist()


def _binary_values(array, large: bool) -> Iterator[bytes]:
    """Each value copied into bytes only when its row is built.

    Building a whole batch of image bytes at once (``to_pylist``) allocates fresh memory
    for every value and page-faults it in: ~10x slower than one value at a time, where
    the allocator recycles the previous row's block.
    """
    _, offset_buffer, data_buffer = array.buffers()
    dtype = np.int64 if large else np.int32
    offsets = np.frombuffer(offset_buffer, dtype=dtype)[
        array.offset : array.offset + len(array) + 1
    ]
    data = memoryview(data_buffer) if data_buffer is not None else memoryview(b"")
    starts, ends = offsets[:-1].tolist(), offsets[1:].tolist()
    return (bytes(data[start:end]) for start, end in zip(starts, ends, strict=True))


def _float_lists(array) -> Iterable[np.ndarray]:
    """Writable float32 rows of a list column: one copy per batch, then a view per row."""
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    lengths = np.diff(offsets)
    if len(lengths) and (lengths == lengths[0]).all():
        # Every row has the embedding dimension: one reshaped copy, iterated as row views.
        return np.array(values[offsets[0] : offsets[-1]]).reshape(len(lengths), int(lengths[0]))
    return [values[start:end].copy() for start, end in zip(offsets[:-1], offsets[1:], strict=True)]


def _tfrecord_rows(unit: WorkUnit, columns: Sequence[str] | None) -> Iterator[dict[str, Any]]:
    from pairmill.tfrecord import read_rows

    for row in read_rows(unit.url):
        if columns is not None:
            _check_columns(unit.url, list(row), columns)
            row = {name: row[name] for name in columns}
        for name in EMBEDDING_FIELDS:
            if row.get(name) is not None:
                row[name] = np.asarray(row[name], dtype=np.float32)
        yield row


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_row(row: dict[str, Any], image_size: int | None = None) -> dict[str, Any]:
    """Decode a row's image bytes to uint8 HxWx3 RGB arrays (in place; returns the row)."""
    for name in IMAGE_FIELDS:
        if row.get(name) is not None:
            row[name] = decode_pixels(row[name], image_size, where=name)
    return row


def decode_pixels(
    data: bytes,
    image_size: int | None = None,
    where: str = "image",
    box: Sequence[float] = (1.0, 0.5, 0.5),
) -> np.ndarray:
    """Decode image bytes to uint8 HxWx3 RGB, EXIF orientation applied.

    Uses the pipeline's own safe decoder (allow-listed formats, pixel limit, CMYK, 16-bit
    and alpha handling). With `image_size`, a square is cropped and resized (bicubic, one
    resampling) to image_size x image_size: `box` = (scale, x, y) gives its side as a
    fraction of the shorter side and its position as fractions of the room left along each
    axis; the default is the center crop of the whole shorter side. JPEGs more than twice
    the needed size are first decoded at a reduced DCT scale.
    """
    from pairmill.images import decode_image
    from pairmill.rejects import Rejection

    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    scale, fx, fy = (float(v) for v in box)
    if image_size:
        prepare = functools.partial(_square, size=image_size, box=(scale, fx, fy))
    decoded = decode_image(
        data,
        _read_config(),
        prepare=prepare if image_size else _writable,
        prepare_min_side=math.ceil(2 * image_size / scale) if image_size else 0,
    )
    if isinstance(decoded, Rejection):
        raise InputError(f"cannot decode {where}: {decoded.reason}: {decoded.detail}")
    return decoded.pixels


@functools.cache
def _read_config():
    from pairmill.images import DecodeConfig

    # Stored images already passed the build's filters; only the bomb limit still applies.
    return DecodeConfig(min_side=0, max_aspect=math.inf)


def _square(im, size: int, box: tuple[float, float, float] = (1.0, 0.5, 0.5)) -> np.ndarray:
    """The (scale, x, y) square of `decode_pixels` resized to size x size in one resampling."""
    from PIL import Image

    scale, fx, fy = box
    width, height = im.size
    side = scale * min(width, height)
    left, top = fx * (width - side), fy * (height - side)
    crop = (left, top, left + side, top + side)
    resized = im.resize((size, size), Image.Resampling.BICUBIC, box=crop, reducing_gap=2.0)
    return _writable(resized)


def _writable(im) -> np.ndarray:
    # np.asarray(im) is read-only, which torch.from_numpy warns about and users trip over.
    return np.array(im)


# ---------------------------------------------------------------------------------------------
# PyTorch


class PairShards(_DatasetBase):
    """Pair shards as a ``torch.utils.data.IterableDataset``.

    Work units (Parquet row groups, whole TFRecord files) are listed once, in a
    deterministic order, and dealt round-robin to every (rank, DataLoader worker), so each
    row is read exactly once per epoch across all ranks and workers. With fewer units than
    ranks x workers some readers get none and yield nothing (rows are never duplicated to
    even them out); ranks may also get different row counts, so a DDP loop should bound its
    steps per epoch. Every rank must use the same `seed` and call `set_epoch` (which cannot
    reach DataLoader workers started with ``persistent_workers=True``).

    Args:
      urls: a path, directory (run or ``pairs/``), glob or fsspec URL, or a list of them.
      shuffle_buffer: rows held in a seeded shuffle buffer; 0 reads in order. When > 0 the
        unit order is shuffled too, differently for each epoch (`set_epoch`).
      seed: seed of both shuffles.
      decode: decode ``cond_image``/``target_image`` to uint8 3xHxW RGB tensors (EXIF
        orientation applied) and make embeddings float32 tensors. Otherwise rows are as
        `read_pairs` gives them: image bytes, float32 numpy embeddings (which the
        DataLoader's default collate turns into tensors anyway).
      image_size: with `decode`, resize the shorter side to this (bicubic) and center-crop
        to image_size x image_size, so that the default collate can stack batches.
      rank: this process's rank; default ``torch.distributed``'s when initialised, else 0.
      world_size: number of ranks; default ``torch.distributed``'s when initialised, else 1.
      columns: read only these columns.

    The other columns are str, int and float; the default collate stacks a batch of
    decoded rows when `image_size` is set (numbers and tensors stacked, strings listed).
    """

    def __init__(
        self,
        urls: Urls,
        shuffle_buffer: int = 0,
        seed: int = 0,
        decode: bool = True,
        image_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        columns: Sequence[str] | None = None,
    ):
        if torch is None:  # pragma: no cover - depends on the environment
            raise MissingDependencyError("PairShards needs torch: pip install torch")
        super().__init__()
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if image_size is not None and image_size < 1:  # fail here, not in a worker later
            raise ValueError(f"image_size must be a positive integer, got {image_size}")
        self.rank, self.world_size = _ranks(rank, world_size)
        self.units = list_units(urls)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.decode = decode
        self.image_size = image_size
        self.columns = list(columns) if columns is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose unit order and buffer shuffle the next iteration uses."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, readers = self._reader()
        rows = read_units(self._unit_order()[reader::readers], self.columns)
        if self.shuffle_buffer:
            rows = _shuffled(
                rows, self.shuffle_buffer, random.Random(f"{self.seed}:{self.epoch}:{reader}")
            )
        if not self.decode:
            yield from rows
            return
        for row in rows:
            yield self._to_torch(row)

    def _reader(self) -> tuple[int, int]:
        """(index, count) of this reader among all ranks x DataLoader workers."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def _unit_order(self) -> list[WorkUnit]:
        if not self.shuffle_buffer:
            return self.units
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.units))
        return [self.units[i] for i in order]

    def _to_torch(self, row: dict[str, Any]) -> dict[str, Any]:
        # Called after the shuffle buffer, which so holds compressed bytes, not pixels.
        for name in IMAGE_FIELDS:
            if row.get(name) is not None:
                pixels = decode_pixels(row[name], self.image_size, where=name)
                row[name] = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        for name in (*EMBEDDING_FIELDS, *TOKEN_FIELDS):
            if row.get(name) is not None:
                # Readers hand out writable float32 arrays that own (or share with their
                # batch) their memory, so the tensor wraps them without another copy.
                row[name] = torch.from_numpy(row[name])
        return row


def _ranks(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit rank/world size, else torch.distributed's when initialised, else (0, 1)."""
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    return rank, world_size


def _shuffled(rows: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Approximately shuffle a stream with a buffer of `buffer_size` items."""
    buffer: list[Any] = []
    for row in rows:
        if len(buffer) < buffer_size:
            buffer.append(row)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = row
    rng.shuffle(buffer)
    yield from buffer
