"""Reading crawl files (Parquet, JSONL, CSV; local or fsspec URLs) into records.

Discovery (`expand_inputs`) runs on the driver and only lists files. Splitting
(`list_splits`) and reading (`read_split`) run on workers: a Parquet file is
split by row group so a large file is read in parallel.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pairmill.errors import InputError
from pairmill.records import CrawlRecord
from pairmill.rejects import MALFORMED, NO_IMAGE_DATA, Rejection

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
REQUIRED = ("page_url", "image_url")
IMAGE_COLUMNS = ("image", "image_path")


@dataclass(frozen=True)
class Split:
    """A readable piece of one input file.

    Args:
      path: the file (fsspec URL or local path).
      format: parquet, jsonl, csv or tsv.
      row_group: the Parquet row group, or -1 for the whole file.
      first_row: the file row number of the split's first row.
    """

    path: str
    format: str
    row_group: int = -1
    first_row: int = 0


def file_format(path: str) -> str | None:
    """The crawl format of a file from its name, or None if it is not a crawl file."""
    name = path.lower()
    for ext in COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return FORMATS.get(posixpath.splitext(name)[1])


def expand_inputs(patterns: list[str]) -> list[str]:
    """Resolve paths, directories and globs to a sorted list of crawl files.

    Raises InputError naming the first pattern that matches nothing.
    """
    import fsspec

    if not patterns:
        raise InputError("no input given: pass one or more crawl files (Parquet, JSONL or CSV)")
    files: list[str] = []
    for pattern in patterns:
        fs, _, paths = fsspec.get_fs_token_paths(pattern)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        matched: list[str] = []
        for path in paths:
            if fs.isdir(path):
                matched.extend(p for p in fs.find(path) if file_format(p))
            elif fs.exists(path):
                matched.append(path)
        if not matched:
            raise InputError(f"input not found: {pattern}")
        for path in matched:
            if not file_format(path):
                raise InputError(
                    f"unsupported input file {path}: use .parquet, .jsonl/.json or .csv/.tsv"
                )
            files.append(path if protocol in ("file", "local") else fs.unstrip_protocol(path))
    return sorted(dict.fromkeys(files))


def list_splits(path: str) -> list[Split]:
    """The splits of one file: its row groups for Parquet, the whole file otherwise."""
    fmt = file_format(path)
    if fmt != "parquet":
        return [Split(path, fmt or "jsonl")]
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as handle:
        meta = pq.ParquetFile(handle).metadata
    splits, first = [], 0
    for group in range(meta.num_row_groups):
        splits.append(Split(path, "parquet", group, first))
        first += meta.row_group(group).num_rows
    return splits or [Split(path, "parquet", 0, 0)]


def read_split(split: Split) -> Iterator[CrawlRecord | tuple[CrawlRecord, Rejection]]:
    """Yield one record per input row; a row that cannot be read yields (record, rejection)."""
    readers = {"parquet": _parquet_rows, "jsonl": _jsonl_rows, "csv": _csv_rows, "tsv": _csv_rows}
    for row_number, row in readers[split.format](split):
        if isinstance(row, Rejection):
            yield CrawlRecord(split.path, row_number, None, None), row
            continue
        yield from _to_record(split.path, row_number, row)


def _to_record(source: str, row_number: int, row: dict[str, Any]):
    record = CrawlRecord(
        source=source,
        row=row_number,
        page_url=_clean_text(row.get("page_url")),
        image_url=_clean_text(row.get("image_url")),
        extra={k: v for k, v in row.items() if k not in REQUIRED + IMAGE_COLUMNS},
    )
    image = row.get("image")
    if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        record.image_path = _clean_text(image.get("path"))
        image = image.get("bytes")
    if isinstance(image, str):  # JSON and CSV carry bytes as base64
        try:
            image = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError) as exc:
            yield record, Rejection(MALFORMED, f"image is not valid base64: {exc}")
            return
    if image is not None:
        record.image = bytes(image)
    path = _clean_text(row.get("image_path")) or record.image_path
    record.image_path = resolve_image_path(path, source) if path else None
    if record.image is None and record.image_path is None:
        yield record, Rejection(NO_IMAGE_DATA, "the record has neither image bytes nor image_path")
        return
    yield record


def resolve_image_path(path: str, source: str) -> str:
    """A relative image_path is relative to the crawl file that names it."""
    if "://" in path or path.startswith("/"):
        return path
    base = source.rsplit("/", 1)[0] if "/" in source else "."
    return f"{base}/{path}"


def _clean_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value).strip()
    return text or None


def _parquet_rows(split: Split):
    import fsspec
    import pyarrow.parquet as pq

    row_number = split.first_row
    with fsspec.open(split.path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        # Batches, not the whole row group: a row group of inline images can be large.
        for batch in parquet.iter_batches(batch_size=256, row_groups=[max(split.row_group, 0)]):
            for row in batch.to_pylist():
                yield row_number, row
                row_number += 1


def _jsonl_rows(split: Split):
    import fsspec

    with fsspec.open(
        split.path, "rt", encoding="utf-8", errors="replace", compression="infer"
    ) as f:
        for number, line in enumerate(f):
            if not line.strip():  # blank lines are not records
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, Rejection(MALFORMED, f"invalid JSON: {exc}")
                continue
            if not isinstance(row, dict):
                yield number, Rejection(MALFORMED, "a JSONL line must be an object")
                continue
            yield number, row


def _csv_rows(split: Split):
    import fsspec

    delimiter = "\t" if split.format == "tsv" else ","
    csv.field_size_limit(1 << 30)  # base64 image columns can be long
    with fsspec.open(split.path, "rb", compression="infer") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
        reader = csv.DictReader(text, delimiter=delimiter)
        for number, row in enumerate(reader):
            if None in row:  # more cells than header columns
                yield number, Rejection(MALFORMED, "row has more cells than the header")
                continue
            yield number, {k: (v if v != "" else None) for k, v in row.items()}
