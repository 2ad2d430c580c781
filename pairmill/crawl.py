"""Reading crawl inputs (local paths or fsspec URLs) into records.

Three input formats, chosen per file (``auto``, the default) or by ``--input-format``:

* ``table``: one row per image (Parquet, JSONL or CSV/TSV) with ``page_url``,
  ``image_url`` and either ``image`` (bytes) or ``image_path``.
* ``documents``: one row per web page with its images (Parquet or JSONL), in the
  MMC4 layout (``url`` + ``image_info``) or the OBELICS layout (``images`` +
  ``metadata`` + ``general_metadata``); one record per image.
* ``img2dataset``: the output of img2dataset, either ``--output_format parquet``
  (the image bytes in a ``jpg``/``png``/``webp`` column) or ``--output_format
  webdataset`` (``NNNNN.tar`` shards of ``KEY.jpg`` + ``KEY.json`` samples). The
  page URL comes from ``--page-column`` or the first of `PAGE_COLUMNS` present;
  samples img2dataset failed to download are ``fetch_error`` rejects.

A document's image (an MMC4 ``image_info`` entry, or an OBELICS ``metadata``
entry) may carry ``image_path`` (relative to the file) or ``image`` (bytes; base64
in JSONL) for images downloaded beforehand; otherwise its record has only a URL.

Discovery (`expand_inputs`) runs on the driver and only lists files. Splitting
(`list_splits`, which also detects the format from the file's schema or first
line) and reading (`read_split`) run on workers: a table or img2dataset Parquet
file is split by row group so a large file is read in parallel; a documents file
and a tar are one split each (their record numbers run across the whole file).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import logging
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pairmill.errors import InputError
from pairmill.records import CrawlRecord
from pairmill.rejects import FETCH_ERROR, MALFORMED, MISSING_FIELD, NO_IMAGE_DATA, Rejection

log = logging.getLogger("pairmill")

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tar": "tar",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
REQUIRED = ("page_url", "image_url")
IMAGE_COLUMNS = ("image", "image_path")

INPUT_FORMATS = ("auto", "table", "documents", "img2dataset")
# The file formats each input format reads.
READABLE = {
    "table": ("parquet", "jsonl", "csv", "tsv"),
    "documents": ("parquet", "jsonl"),
    "img2dataset": ("parquet", "tar"),
}
# img2dataset: the page URL column tried when --page-column is not given, and the
# image column / tar member extensions (named after img2dataset's --encode_format).
PAGE_COLUMNS = ("page_url", "page", "source_url", "webpage")
IMG2DATASET_IMAGES = ("jpg", "jpeg", "png", "webp")
IMG2DATASET_META = ("url", "status", "error_message")
# Document text columns are never read: records are the images.
DOCUMENT_TEXTS = ("text_list", "texts")
_STATS_FILE = re.compile(r"^\d+_stats\.json$")  # img2dataset's per-shard statistics


@dataclass(frozen=True)
class Split:
    """A readable piece of one input file.

    Args:
      path: the file (fsspec URL or local path).
      format: parquet, jsonl, csv, tsv or tar.
      row_group: the Parquet row group, or -1 for the whole file.
      first_row: the file row number of the split's first row.
      kind: the input format: table, documents or img2dataset.
      page_column: img2dataset's page URL column (None tries `PAGE_COLUMNS`).
    """

    path: str
    format: str
    row_group: int = -1
    first_row: int = 0
    kind: str = "table"
    page_column: str | None = None


def file_format(path: str) -> str | None:
    """The crawl format of a file from its name, or None if it is not a crawl file."""
    name = path.lower()
    for ext in COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return FORMATS.get(posixpath.splitext(name)[1])


def expand_inputs(patterns: list[str], input_format: str = "auto") -> list[str]:
    """Resolve paths, directories and globs to a sorted list of crawl files.

    img2dataset's ``NNNNN_stats.json`` files are skipped, and so is a Parquet file
    next to a tar of the same name (img2dataset webdataset output: the tar holds
    the same samples with their images). Raises InputError naming the first
    pattern that matches nothing, or a file `input_format` cannot read.
    """
    import fsspec

    if input_format not in INPUT_FORMATS:
        raise InputError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}")
    if not patterns:
        raise InputError(
            "no input given: pass one or more crawl files (Parquet, JSONL, CSV or img2dataset .tar)"
        )
    files: list[str] = []
    skipped_stats = 0
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
                    f"unsupported input file {path}: use .parquet, .jsonl/.json, .csv/.tsv "
                    "or .tar (img2dataset webdataset)"
                )
            if _STATS_FILE.match(posixpath.basename(path)):
                skipped_stats += 1
                continue
            files.append(path if protocol in ("file", "local") else fs.unstrip_protocol(path))
    files = sorted(dict.fromkeys(files))
    if skipped_stats:
        log.info("skipping %d img2dataset *_stats.json file(s): not records", skipped_stats)
    if input_format in ("auto", "img2dataset"):
        tars = {_stem(f) for f in files if file_format(f) == "tar"}
        siblings = {f for f in files if file_format(f) == "parquet" and _stem(f) in tars}
        if siblings:
            log.info(
                "ignoring %d Parquet file(s) next to .tar shards of the same name "
                "(img2dataset webdataset metadata; the tars hold the same samples with images)",
                len(siblings),
            )
            files = [f for f in files if f not in siblings]
    if not files:
        raise InputError(f"no crawl records in {', '.join(patterns)}")
    if input_format != "auto":
        readable = READABLE[input_format]
        for path in files:
            if file_format(path) not in readable:
                raise InputError(
                    f"--input-format {input_format} reads {' or '.join(readable)} files, not {path}"
                )
    return files


def _stem(path: str) -> str:
    """The path without its compression and format extensions."""
    name = path
    for ext in COMPRESSIONS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return posixpath.splitext(name)[0]


def detect_input_format(path: str) -> str:
    """table, documents or img2dataset, from the file's name and schema or first line.

    A ``.tar`` is img2dataset webdataset output. A Parquet or JSONL file with an
    ``image_info`` column (MMC4), or ``images`` with ``general_metadata`` or
    ``texts`` (OBELICS), holds documents. A Parquet file with ``url``, ``status``
    and ``key`` columns is img2dataset output. Anything else is a table.
    """
    fmt = file_format(path)
    if fmt == "tar":
        return "img2dataset"
    if fmt == "parquet":
        names = set(_parquet_names(path))
    elif fmt == "jsonl":
        names = set(_first_json_keys(path))
    else:
        return "table"
    if "image_info" in names or ("images" in names and names & {"general_metadata", "texts"}):
        return "documents"
    if fmt == "parquet" and {"url", "status", "key"} <= names:
        return "img2dataset"
    return "table"


def list_splits(
    path: str, input_format: str = "auto", page_column: str | None = None
) -> list[Split]:
    """The splits of one file: row groups for table and img2dataset Parquet, else the file."""
    fmt = file_format(path) or "jsonl"
    kind = detect_input_format(path) if input_format == "auto" else input_format
    if fmt not in READABLE.get(kind, ()):
        raise InputError(f"--input-format {kind} cannot read {path}")
    if fmt != "parquet" or kind == "documents":
        return [Split(path, fmt, -1, 0, kind, page_column)]
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as handle:
        meta = pq.ParquetFile(handle).metadata
    splits, first = [], 0
    for group in range(meta.num_row_groups):
        splits.append(Split(path, "parquet", group, first, kind, page_column))
        first += meta.row_group(group).num_rows
    return splits or [Split(path, "parquet", -1, 0, kind, page_column)]


def read_split(split: Split) -> Iterator[CrawlRecord | tuple[CrawlRecord, Rejection]]:
    """Yield one record per input record; one that cannot be read yields (record, rejection).

    An input record is a row of a table, an image of a document (a malformed
    document is one record), or a row or tar sample of img2dataset output.
    """
    if split.kind == "documents":
        yield from _document_records(split)
        return
    if split.kind == "img2dataset":
        reader = _tar_records if split.format == "tar" else _img2dataset_parquet_records
        yield from reader(split)
        return
    readers = {"parquet": _parquet_rows, "jsonl": _jsonl_rows, "csv": _csv_rows, "tsv": _csv_rows}
    for row_number, row in readers[split.format](split):
        if isinstance(row, Rejection):
            yield CrawlRecord(split.path, row_number, None, None), row
            continue
        yield from _to_record(split.path, row_number, row)


def _to_record(source: str, row_number: int, row: dict[str, Any]):
    extra = {k: v for k, v in row.items() if k not in REQUIRED + IMAGE_COLUMNS}
    yield from _record(
        source,
        row_number,
        row.get("page_url"),
        row.get("image_url"),
        row.get("image"),
        row.get("image_path"),
        extra,
    )


def _record(
    source: str,
    row_number: int,
    page_url: Any,
    image_url: Any,
    image: Any,
    image_path: Any,
    extra: dict[str, Any],
    missing: str | None = None,
):
    """A record from its fields, or (record, rejection) when its image cannot be had.

    A record with only an image URL is yielded as is: the pipeline fetches it over
    HTTP(S). `missing` names a reason to reject such records instead (img2dataset
    metadata without images: the images are in the tars).
    """
    record = CrawlRecord(
        source=source,
        row=row_number,
        page_url=_clean_text(page_url),
        image_url=_clean_text(image_url),
        extra=extra,
    )
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
    path = _clean_text(image_path) or record.image_path
    record.image_path = resolve_image_path(path, source) if path else None
    if record.image is None and record.image_path is None and missing:
        yield record, Rejection(NO_IMAGE_DATA, missing)
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


# Documents (MMC4, OBELICS) ---------------------------------------------------------------


class _Malformed(Exception):
    """A document that cannot be read; it becomes one malformed_record reject."""


def _document_records(split: Split):
    """One record per image of each document; `row` runs across the whole file."""
    if split.format == "parquet":
        documents = _parquet_rows(split, skip=DOCUMENT_TEXTS, batch_size=64)
    else:
        documents = _jsonl_rows(split)
    index = count = without_images = 0
    for number, document in documents:
        count += 1
        try:
            if isinstance(document, Rejection):
                raise _Malformed(document.detail)
            page_url, images = _document_images(document)
        except _Malformed as exc:
            page = document.get("url") if isinstance(document, dict) else None
            record = CrawlRecord(
                split.path, index, _clean_text(page), None, extra={"document": number}
            )
            yield record, Rejection(MALFORMED, f"document {number}: {exc}")
            index += 1
            continue
        if not images:
            without_images += 1
            continue
        for position, image_url, image, image_path, extra in images:
            extra = {**extra, "document": number, "position": position}
            yield from _record(split.path, index, page_url, image_url, image, image_path, extra)
            index += 1
    if without_images:
        log.info(
            "%s: %d of %d document(s) have no images (no records from them)",
            split.path,
            without_images,
            count,
        )


def _document_images(document: dict[str, Any]):
    """(page_url, [(position, image_url, image, image_path, extra), ...]) of one document."""
    if "image_info" in document:
        return _mmc4_images(document)
    if "images" in document:
        return _obelics_images(document)
    raise _Malformed("neither image_info (MMC4) nor images (OBELICS)")


def _mmc4_images(document: dict[str, Any]):
    page_url = _clean_text(document.get("url"))
    if not page_url:
        raise _Malformed("no url")
    entries = document.get("image_info") or []
    if not isinstance(entries, list):
        raise _Malformed("image_info is not a list")
    page_extra = _scalars(document, ("url", "image_info", *DOCUMENT_TEXTS))
    images = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _Malformed(f"image_info[{position}] is not an object")
        extra = {k: v for k, v in entry.items() if k not in ("raw_url", *IMAGE_COLUMNS)}
        images.append(
            (
                position,
                entry.get("raw_url"),
                entry.get("image"),
                entry.get("image_path"),
                {**page_extra, **extra},
            )
        )
    return page_url, images


def _obelics_images(document: dict[str, Any]):
    general = _json_field(document, "general_metadata", dict) or {}
    page_url = _clean_text(general.get("url")) or _clean_text(document.get("url"))
    if not page_url:
        raise _Malformed("no page url (general_metadata.url or url)")
    slots = document.get("images") or []
    if not isinstance(slots, list):
        raise _Malformed("images is not a list")
    metadata = _json_field(document, "metadata", list)
    if metadata is not None and len(metadata) != len(slots):
        raise _Malformed(f"metadata has {len(metadata)} entries for {len(slots)} image slots")
    page_extra = _scalars(
        document, ("url", "images", "metadata", "general_metadata", *DOCUMENT_TEXTS)
    )
    images = []
    for position, slot in enumerate(slots):
        if slot is None or (isinstance(slot, str) and not slot.strip()):
            continue  # a text slot
        meta = (metadata[position] if metadata is not None else None) or {}
        if not isinstance(meta, dict):
            raise _Malformed(f"metadata[{position}] is not an object")
        if isinstance(slot, str):
            image_url, image = slot, None
        elif isinstance(slot, dict):  # an embedded image ({"bytes", "path"})
            image_url, image = slot.get("url") or meta.get("src"), slot
        else:
            raise _Malformed(f"images[{position}] is neither a URL nor an image")
        extra = {k: v for k, v in meta.items() if k not in IMAGE_COLUMNS}
        images.append((position, image_url, image, meta.get("image_path"), {**page_extra, **extra}))
    return page_url, images


def _json_field(document: dict[str, Any], name: str, kind: type):
    """A field that may hold JSON text (OBELICS stores metadata as strings)."""
    value = document.get(name)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _Malformed(f"{name} is not valid JSON: {exc}") from None
    if value is not None and not isinstance(value, kind):
        raise _Malformed(f"{name} is not a JSON {'list' if kind is list else 'object'}")
    return value


def _scalars(document: dict[str, Any], skip: Iterable[str]) -> dict[str, Any]:
    """The document's other scalar fields (carried into each image's extra)."""
    skip = set(skip)
    return {
        k: v
        for k, v in document.items()
        if k not in skip and isinstance(v, (str, int, float, bool))
    }


# img2dataset ------------------------------------------------------------------------------


def _page_column(names: Iterable[str], page_column: str | None) -> str | None:
    names = set(names)
    if page_column:
        return page_column if page_column in names else None
    return next((name for name in PAGE_COLUMNS if name in names), None)


def _no_page_column(page_column: str | None) -> str:
    if page_column:
        return f"no page column {page_column!r}: pass --page-column with the page URL column"
    return f"no page column ({', '.join(PAGE_COLUMNS)}): pass --page-column"


def _img2dataset_record(split: Split, row_number: int, meta: dict, image, missing: str | None):
    """One img2dataset sample: a record, a fetch_error (img2dataset failed) or missing_field."""
    page = _page_column(meta, split.page_column)
    drop = {*IMG2DATASET_META, *IMG2DATASET_IMAGES, page}
    extra = {k: v for k, v in meta.items() if k not in drop}
    page_url = meta.get(page) if page else None
    status = meta.get("status")
    if page is None or (status is not None and status != "success"):
        record = CrawlRecord(
            split.path, row_number, _clean_text(page_url), _clean_text(meta.get("url")), extra=extra
        )
        if page is None:
            yield record, Rejection(MISSING_FIELD, _no_page_column(split.page_column))
        else:  # img2dataset could not download or resize it: there are no bytes
            error = meta.get("error_message") or "no error message"
            yield record, Rejection(FETCH_ERROR, f"img2dataset {status}: {error}")
        return
    yield from _record(
        split.path, row_number, page_url, meta.get("url"), image, None, extra, missing
    )


def _img2dataset_parquet_records(split: Split):
    names = _parquet_names(split.path)
    image_column = next((name for name in IMG2DATASET_IMAGES if name in names), None)
    missing = None
    if image_column is None:
        missing = (
            "the img2dataset Parquet has no image column (jpg, png or webp); for "
            "--output_format webdataset, give the .tar shards as input"
        )
    if _page_column(names, split.page_column) is None:
        log.warning("%s: %s", split.path, _no_page_column(split.page_column))
    for number, row in _parquet_rows(split):
        image = row.get(image_column) if image_column else None
        yield from _img2dataset_record(split, number, row, image, missing)


def _tar_records(split: Split):
    """One record per webdataset sample (members sharing a key), streamed; `row` = sample index."""
    import tarfile

    import fsspec

    index = 0
    with fsspec.open(split.path, "rb") as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for key, members in _tar_samples(tar):
                    yield from _tar_sample(split, index, key, members)
                    index += 1
        except (tarfile.TarError, EOFError, OSError) as exc:
            # A truncated or corrupt tar: the rest of it is one unreadable record.
            record = CrawlRecord(split.path, index, None, None)
            yield record, Rejection(MALFORMED, f"tar unreadable after {index} samples: {exc}")


def _tar_samples(tar) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample; a sample's members are adjacent (webdataset)."""
    current, members = None, {}
    for member in tar:
        if not member.isfile():
            continue
        directory, name = posixpath.split(member.name)
        if name.startswith(".") or "." not in name:
            continue
        stem, extension = name.split(".", 1)
        key = posixpath.join(directory, stem)
        if key != current:
            if current is not None:
                yield current, members
            current, members = key, {}
        members.setdefault(extension.lower(), tar.extractfile(member).read())
    if current is not None:
        yield current, members


def _tar_sample(split: Split, index: int, key: str, members: dict[str, bytes]):
    try:
        meta = json.loads(members["json"]) if "json" in members else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        meta, detail = None, f"{key}.json is not valid JSON: {exc}"
    else:
        detail = f"{key}.json is not an object"
    if not isinstance(meta, dict):
        record = CrawlRecord(split.path, index, None, None, extra={"key": key})
        yield record, Rejection(MALFORMED, detail)
        return
    if "txt" in members and "caption" not in meta:
        meta["caption"] = members["txt"].decode("utf-8", "replace")
    meta.setdefault("key", key)
    extension = next((ext for ext in IMG2DATASET_IMAGES if ext in members), None)
    image = members[extension] if extension else None
    missing = f"sample {key} has no image member (.jpg, .png or .webp)"
    yield from _img2dataset_record(split, index, meta, image, missing)


# File readers -----------------------------------------------------------------------------


def _parquet_names(path: str) -> list[str]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as handle:
        return list(pq.ParquetFile(handle).schema_arrow.names)


def _first_json_keys(path: str) -> list[str]:
    """The keys of a JSONL file's first record (none if it is not a JSON object)."""
    import fsspec

    with fsspec.open(path, "rt", encoding="utf-8", errors="replace", compression="infer") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return []
                return list(row) if isinstance(row, dict) else []
    return []


def _parquet_rows(split: Split, skip: Iterable[str] = (), batch_size: int = 256):
    import fsspec
    import pyarrow.parquet as pq

    row_number = split.first_row
    groups = None if split.row_group < 0 else [split.row_group]
    with fsspec.open(split.path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        skip = set(skip)
        columns = [name for name in parquet.schema_arrow.names if name not in skip]
        # Batches, not the whole row group: a row group of inline images can be large.
        for batch in parquet.iter_batches(
            batch_size=batch_size, row_groups=groups, columns=columns
        ):
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
