"""Check a finished run against its manifest.json, shard by shard, streaming.

Every shard of every table: present, byte size, sha256, row count, schema version
(Parquet: the ``pairmill.schema`` file metadata and the columns; TFRecord: every
Example holds exactly the schema's features) and, for TFRecord, the CRC of every
record. Pair rows: similarity inside the run's band and equal to the float64 dot
product of the stored embeddings rounded to float32, unit-norm embeddings, image
bytes matching their ``*_sha256`` column, and a seeded sample of images decoded
with Pillow. Images: sha256 and unit norm. Similarities: kept rows in band and
their count. Rejects: counts per reason. Manifest: counts reconcile and each
table's rows match the counts.

Shards are read a Parquet batch or a TFRecord record at a time, so a run of any
size is checked in bounded memory. Row-level problems are summarised per shard
and kind (the first offending row and how many more), never one line per row.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import schemas
from pairmill.errors import InputError
from pairmill.manifest import MANIFEST, TABLES

UNIT_NORM_TOLERANCE = 1e-3
SIMILARITY_TOLERANCE = 1e-6
BATCH_ROWS = 64
_HASH_CHUNK = 8 * 2**20
# The table whose rows the manifest counts, and under which count.
_COUNT_OF_TABLE = {
    "pairs": "kept_pairs",
    "images": "images",
    "similarities": "candidate_pairs",
    "rejects": "rejected",
}
_ROW_NOUN = {"pairs": "pair", "images": "image", "similarities": "similarity", "rejects": "reject"}
_EXIF_ORIENTATION = 0x0112


@dataclass
class _Report:
    """Problems found so far, and what was checked."""

    problems: list[dict[str, str]] = field(default_factory=list)
    shards_checked: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    images_decoded: int = 0

    def add(self, shard: str, problem: str) -> None:
        self.problems.append({"shard": shard, "problem": problem})


class _Tally:
    """Row-level problems of one shard, one entry per kind: the first example and a count."""

    def __init__(self) -> None:
        self._seen: dict[str, list] = {}

    def add(self, kind: str, description: str) -> None:
        entry = self._seen.setdefault(kind, [0, description])
        entry[0] += 1

    def flush(self, shard: str, report: _Report) -> None:
        for count, first in self._seen.values():
            more = f" (and {count - 1} more rows)" if count > 1 else ""
            report.add(shard, first + more)


class _HashingReader:
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, raw, hasher) -> None:
        self._raw = raw
        self._hasher = hasher
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if self._hasher is not None:
            self._hasher.update(data)
        self.count += len(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(_HASH_CHUNK):
            pass


def validate_run(run_dir: str, sample: int = 8, check_sha256: bool = True) -> dict[str, Any]:
    """Check every shard of a run against its manifest.json.

    Args:
      run_dir: the run directory (local path or fsspec URL).
      sample: images decoded with Pillow per pair shard (a seeded, deterministic sample).
      check_sha256: hash every shard (turn off to see what the other checks alone catch).

    Returns:
      ``{"ok", "run", "shards_checked", "rows_checked", "rows", "images_decoded",
      "problems": [{"shard": path or "manifest", "problem": one line}]}``.

    Raises:
      InputError: the run directory or its manifest.json is missing or unreadable.
    """
    import fsspec

    from pairmill.manifest import load_manifest

    if sample < 0:
        raise InputError(f"--sample must be 0 or more, got {sample}")
    fs, root = fsspec.core.url_to_fs(run_dir)
    if not fs.isdir(root):
        raise InputError(f"{run_dir}: no such run directory")
    try:
        manifest = load_manifest(run_dir)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{run_dir}/{MANIFEST} is not valid JSON ({exc})") from exc
    report = _Report()
    check = _Checker(fs, root.rstrip("/"), manifest, report, sample, check_sha256)
    check.manifest_counts()
    for table in TABLES:
        check.table(table)
    check.table_totals()
    return {
        "ok": not report.problems,
        "run": run_dir,
        "shards_checked": report.shards_checked,
        "rows_checked": sum(report.rows.values()),
        "rows": dict(report.rows),
        "images_decoded": report.images_decoded,
        "problems": report.problems,
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What ``pairmill validate`` prints: one OK line, or one BROKEN line per broken shard."""
    if result["ok"]:
        rows = ", ".join(
            f"{n:,} {_ROW_NOUN.get(table, table)} rows" for table, n in result["rows"].items()
        )
        return [
            f"OK: {result['run']}: {result['shards_checked']} shards, {rows} checked "
            f"({result['images_decoded']} images decoded)"
        ]
    by_shard: dict[str, list[str]] = {}
    for item in result["problems"]:
        by_shard.setdefault(item["shard"], []).append(item["problem"])
    return [f"BROKEN {shard}: {'; '.join(problems)}" for shard, problems in by_shard.items()]


class _Checker:
    def __init__(self, fs, root: str, manifest: dict, report: _Report, sample: int, sha: bool):
        self.fs = fs
        self.root = root
        self.manifest = manifest
        self.report = report
        self.sample = sample
        self.check_sha256 = sha
        self.counts = manifest.get("counts") or {}
        thresholds = manifest.get("thresholds") or {}
        self.low = thresholds.get("low")
        self.high = thresholds.get("high")
        self.kept_seen = 0
        self.reasons_seen: dict[str, int] = {}

    # ------------------------------------------------------------ manifest

    def manifest_counts(self) -> None:
        counts, add = self.counts, self.report.add
        needed = ("records_in", "images", "rejected", "kept_pairs", "candidate_pairs")
        missing = [key for key in needed if not isinstance(counts.get(key), int)]
        if missing:
            add("manifest", f"counts lack {', '.join(missing)}")
            return
        if counts["records_in"] != counts["images"] + counts["rejected"]:
            add(
                "manifest",
                f"counts do not reconcile: records_in {counts['records_in']} != images "
                f"{counts['images']} + rejected {counts['rejected']}",
            )
        by_reason = counts.get("rejects") or {}
        if sum(by_reason.values()) != counts["rejected"]:
            add(
                "manifest",
                f"rejects by reason sum to {sum(by_reason.values())}, "
                f"counts.rejected is {counts['rejected']}",
            )
        if self.low is None or self.high is None:
            add("manifest", "thresholds lack low or high")

    def table_totals(self) -> None:
        """Cross-table checks that need every shard read first."""
        add = self.report.add
        kept = self.counts.get("kept_pairs")
        if "similarities" in self.report.rows and isinstance(kept, int) and self.kept_seen != kept:
            add(
                "manifest",
                f"similarities mark {self.kept_seen} rows kept, counts.kept_pairs is {kept}",
            )
        by_reason = self.counts.get("rejects") or {}
        if "rejects" in self.report.rows and self.reasons_seen != by_reason:
            diff = sorted(
                f"{reason} {self.reasons_seen.get(reason, 0)} vs {by_reason.get(reason, 0)}"
                for reason in set(by_reason) | set(self.reasons_seen)
                if self.reasons_seen.get(reason, 0) != by_reason.get(reason, 0)
            )
            add("manifest", f"reject rows by reason differ from counts.rejects: {', '.join(diff)}")

    # ------------------------------------------------------------ tables

    def table(self, table: str) -> None:
        add = self.report.add
        entry = (self.manifest.get("tables") or {}).get(table)
        if entry is None:
            add("manifest", f"no table {table!r} in {MANIFEST}")
            return
        shards = entry.get("shards") or []
        listed_rows = sum(s.get("rows", 0) for s in shards)
        listed_bytes = sum(s.get("bytes", 0) for s in shards)
        if entry.get("rows") != listed_rows:
            add("manifest", f"{table}: rows {entry.get('rows')} but its shards list {listed_rows}")
        if entry.get("bytes") != listed_bytes:
            add(
                "manifest",
                f"{table}: bytes {entry.get('bytes')} but its shards list {listed_bytes}",
            )
        count_key = _COUNT_OF_TABLE[table]
        if isinstance(self.counts.get(count_key), int) and listed_rows != self.counts[count_key]:
            add(
                "manifest",
                f"{table} has {listed_rows} rows, counts.{count_key} is {self.counts[count_key]}",
            )
        try:
            schema = schemas.load(entry.get("schema", ""))
        except (KeyError, ValueError) as exc:
            add("manifest", f"{table}: {exc}".replace('"', ""))
            schema = None
        fmt = entry.get("format")
        if fmt not in ("parquet", "tfrecord"):
            add("manifest", f"{table}: unknown format {fmt!r}")
            fmt = None
        self.report.rows.setdefault(table, 0)
        for shard in shards:
            self.shard(table, shard, schema, fmt)
        self.unlisted(table, {s.get("path") for s in shards})

    def unlisted(self, table: str, listed: set) -> None:
        folder = f"{self.root}/{table}"
        if not self.fs.isdir(folder):
            return
        for path in sorted(self.fs.ls(folder, detail=False)):
            relative = f"{table}/{path.rstrip('/').rsplit('/', 1)[-1]}"
            if relative not in listed:
                self.report.add(relative, f"not listed in {MANIFEST}")

    def shard(self, table: str, shard: dict, schema, fmt: str | None) -> None:
        relative = shard.get("path", "?")
        path = f"{self.root}/{relative}"
        add = self.report.add
        if not self.fs.isfile(path):
            add(relative, f"missing ({MANIFEST} lists it with {shard.get('rows')} rows)")
            return
        self.report.shards_checked += 1
        size = self.fs.size(path)
        if size != shard.get("bytes"):
            add(relative, f"size {size} bytes, {MANIFEST} says {shard.get('bytes')}")
        if schema is None or fmt is None:
            if self.check_sha256:
                self.sha256(relative, shard, _hash_file(self.fs, path))
            return
        tally = _Tally()
        rows_check = _RowChecks(self, table, relative, tally, shard.get("rows") or 0)
        if fmt == "parquet":
            if self.check_sha256:
                self.sha256(relative, shard, _hash_file(self.fs, path))
            rows = self.parquet(path, relative, schema, rows_check)
        else:
            rows = self.tfrecord(path, relative, shard, schema, rows_check)
        tally.flush(relative, self.report)
        if rows is not None and rows != shard.get("rows"):
            add(relative, f"{rows} rows, {MANIFEST} says {shard.get('rows')}")
        self.report.rows[table] += rows or 0

    def sha256(self, relative: str, shard: dict, digest: str) -> None:
        if digest != shard.get("sha256"):
            listed = str(shard.get("sha256"))[:12]
            self.report.add(relative, f"sha256 mismatch: file {digest[:12]}…, {MANIFEST} {listed}…")

    def parquet(self, path: str, relative: str, schema, rows_check) -> int | None:
        """Check a Parquet shard a batch at a time; the rows read, or None if unreadable."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        add = self.report.add
        rows = 0
        try:
            with self.fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                file_schema = parquet.schema_arrow
                found = schemas.schema_id_of(file_schema)
                if found != schema.id:
                    add(relative, f"schema {found or 'unmarked'}, {MANIFEST} says {schema.id}")
                    return None
                expected = schema.arrow()
                if not file_schema.remove_metadata().equals(expected.remove_metadata()):
                    add(
                        relative,
                        f"columns differ from {schema.id}: {_column_diff(file_schema, expected)}",
                    )
                    return None
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
                    rows_check.batch(_columns_of_batch(batch, schema, rows))
                    rows += batch.num_rows
        except (pa.ArrowException, OSError, ValueError) as exc:
            add(relative, f"unreadable Parquet after {rows} rows: {_one_line(exc)}")
            return None
        return rows

    def tfrecord(self, path: str, relative: str, shard: dict, schema, rows_check) -> int | None:
        """Check a TFRecord shard record by record, hashing the file in the same pass."""
        from pairmill import tfrecord

        add = self.report.add
        hasher = hashlib.sha256() if self.check_sha256 else None
        rows = 0
        broken = False
        chunk: list[tuple[int, dict[str, Any]]] = []
        with self.fs.open(path, "rb") as raw:
            hashing = _HashingReader(raw, hasher)
            try:
                stream = tfrecord.open_records(hashing, relative)
                offset = 0
                for index, data in enumerate(tfrecord.iter_records(stream, check_crc=True)):
                    rows += 1
                    try:
                        chunk.append((index, tfrecord.row_from_example(data, schema, arrays=True)))
                    except tfrecord.CorruptShardError as exc:
                        rows_check.tally.add(
                            "example", f"record {index} at byte {offset}: {_one_line(exc)}"
                        )
                    offset += 16 + len(data)
                    if len(chunk) >= BATCH_ROWS:
                        rows_check.batch(_columns_of_rows(chunk, schema))
                        chunk = []
            except tfrecord.CorruptShardError as exc:
                broken = True
                where = " (offsets in the uncompressed stream)" if _gzipped(relative) else ""
                add(relative, f"{_one_line(exc)}{where}")
            if chunk:
                rows_check.batch(_columns_of_rows(chunk, schema))
            hashing.drain()
        if hasher is not None:
            self.sha256(relative, shard, hasher.hexdigest())
        return None if broken else rows


class _RowChecks:
    """The content checks of one shard's rows, fed a column batch at a time."""

    def __init__(self, checker: _Checker, table: str, relative: str, tally: _Tally, rows: int):
        self.checker = checker
        self.table = table
        self.tally = tally
        rng = random.Random(f"pairmill-validate:{relative}")
        self.sampled = set(rng.sample(range(rows), min(checker.sample, rows))) if rows else set()

    def batch(self, cols: dict[str, list]) -> None:
        """Check a batch: {column: values}, plus ``_row``, each row's index in the shard."""
        if self.table == "pairs":
            self.pairs(cols)
        elif self.table == "images":
            self.images(cols)
        elif self.table == "similarities":
            self.similarities(cols)
        else:
            for reason in cols["reason"]:
                self.checker.reasons_seen[reason] = self.checker.reasons_seen.get(reason, 0) + 1

    def _where(self, cols: dict, index: int, id_column: str) -> str:
        return f"row {cols['_row'][index]} ({id_column} {cols[id_column][index]})"

    def _unit(self, cols, name: str, id_column: str) -> np.ndarray | None:
        """The embeddings of a batch as a matrix, after checking they are unit-norm."""
        vectors = cols[name]
        lengths = {len(v) for v in vectors}
        if len(lengths) > 1 or 0 in lengths:
            lengths_text = ", ".join(str(n) for n in sorted(lengths))
            self.tally.add(f"{name}-dim", f"{name} lengths in a batch of rows: {lengths_text}")
            return None
        matrix = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1)
        norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
        for i in np.flatnonzero(~(np.abs(norms - 1) < UNIT_NORM_TOLERANCE)):
            where = self._where(cols, int(i), id_column)
            self.tally.add(f"{name}-norm", f"{where}: {name} has norm {norms[i]:.6f}, not 1")
        return matrix

    def _image_hashes(self, cols, side: str, id_column: str) -> None:
        pairs = zip(cols[f"{side}image"], cols[f"{side}sha256"], strict=True)
        for i, (data, digest) in enumerate(pairs):
            actual = hashlib.sha256(data).hexdigest()
            if actual != digest:
                where = self._where(cols, i, id_column)
                self.tally.add(
                    f"{side}sha256",
                    f"{where}: {side}image bytes hash to {actual[:12]}…, "
                    f"{side}sha256 says {str(digest)[:12]}…",
                )

    def _tokens(self, cols, sides: tuple[str, ...], id_column: str) -> None:
        """pair_v2/image_v2: each token blob holds token_count x token_dim finite float16
        values on a square grid."""
        if "token_count" not in cols:
            return
        for i, (count, dim) in enumerate(zip(cols["token_count"], cols["token_dim"], strict=True)):
            side = math.isqrt(max(count, 0))
            if count < 1 or dim < 1 or side * side != count:
                where = self._where(cols, i, id_column)
                self.tally.add("token-shape", f"{where}: {count} x {dim} tokens (not a grid)")
                continue
            for prefix in sides:
                data = cols[f"{prefix}tokens"][i]
                if len(data) != 2 * count * dim:
                    where = self._where(cols, i, id_column)
                    self.tally.add(
                        f"{prefix}tokens-size",
                        f"{where}: {prefix}tokens hold {len(data)} bytes, "
                        f"not {count} x {dim} float16",
                    )
                elif not np.isfinite(np.frombuffer(data, "<f2")).all():
                    where = self._where(cols, i, id_column)
                    self.tally.add(
                        f"{prefix}tokens-finite", f"{where}: {prefix}tokens are not finite"
                    )

    def pairs(self, cols) -> None:
        self._tokens(cols, ("cond_", "target_"), "pair_id")
        low, high = self.checker.low, self.checker.high
        sims = np.asarray(cols["similarity"], dtype=np.float32)
        if low is not None and high is not None:
            outside = ~((sims >= np.float32(low)) & (sims <= np.float32(high)))
            for i in np.flatnonzero(outside):
                where = self._where(cols, int(i), "pair_id")
                self.tally.add(
                    "band", f"{where}: similarity {sims[i]:.6f} outside the band [{low}, {high}]"
                )
        cond = self._unit(cols, "cond_embedding", "pair_id")
        target = self._unit(cols, "target_embedding", "pair_id")
        if cond is not None and target is not None:
            if cond.shape != target.shape:
                self.tally.add("dims", f"cond and target embeddings differ: {cond.shape}")
            else:
                dots = (cond.astype(np.float64) * target.astype(np.float64)).sum(axis=1)
                dots = dots.astype(np.float32)
                for i in np.flatnonzero(~(np.abs(dots - sims) <= SIMILARITY_TOLERANCE)):
                    where = self._where(cols, int(i), "pair_id")
                    self.tally.add(
                        "dot",
                        f"{where}: similarity {sims[i]:.7f} != dot product of the embeddings "
                        f"{dots[i]:.7f}",
                    )
        for side in ("cond_", "target_"):
            self._image_hashes(cols, side, "pair_id")
        for i, row in enumerate(cols["_row"]):
            if row not in self.sampled:
                continue
            for side in ("cond_", "target_"):
                problem = _decode_problem(
                    cols[f"{side}image"][i], cols[f"{side}width"][i], cols[f"{side}height"][i]
                )
                self.checker.report.images_decoded += 1
                if problem:
                    where = self._where(cols, i, "pair_id")
                    self.tally.add(f"{side}decode", f"{where}: {side}image {problem}")

    def images(self, cols) -> None:
        self._tokens(cols, ("",), "image_id")
        self._unit(cols, "embedding", "image_id")
        self._image_hashes(cols, "", "image_id")

    def similarities(self, cols) -> None:
        kept = np.asarray(cols["kept"], dtype=bool)
        self.checker.kept_seen += int(kept.sum())
        low, high = self.checker.low, self.checker.high
        if low is None or high is None:
            return
        sims = np.asarray(cols["similarity"], dtype=np.float32)
        outside = kept & ~((sims >= np.float32(low)) & (sims <= np.float32(high)))
        for i in np.flatnonzero(outside):
            where = self._where(cols, int(i), "pair_id")
            self.tally.add(
                "band", f"{where}: kept with similarity {sims[i]:.6f} outside [{low}, {high}]"
            )


def _columns_of_batch(batch, schema, first: int) -> dict[str, list]:
    """A record batch as {column: values}: float lists as float32 arrays, the rest Python."""
    cols: dict[str, list] = {"_row": list(range(first, first + batch.num_rows))}
    for column_def in schema.fields:
        column = batch.column(column_def.name)
        if column_def.type == "list<float32>" and column.null_count == 0:
            offsets = column.offsets.to_numpy()
            values = column.values.to_numpy(zero_copy_only=False)
            bounds = zip(offsets[:-1], offsets[1:], strict=True)
            cols[column_def.name] = [values[a:b] for a, b in bounds]
        else:
            cols[column_def.name] = column.to_pylist()
    return cols


def _columns_of_rows(rows: list[tuple[int, dict[str, Any]]], schema) -> dict[str, list]:
    """(row index, row) pairs as {column: values}."""
    cols: dict[str, list] = {"_row": [index for index, _ in rows]}
    for name in schema.names:
        cols[name] = [row[name] for _, row in rows]
    return cols


def _column_diff(found, expected) -> str:
    have = {f.name: str(f.type) for f in found}
    want = {f.name: str(f.type) for f in expected}
    parts = [f"missing {n}" for n in want if n not in have]
    parts += [f"unexpected {n}" for n in have if n not in want]
    parts += [f"{n} is {have[n]}, not {want[n]}" for n in want if n in have and have[n] != want[n]]
    return ", ".join(parts) or "column order"


def _decode_problem(data: bytes, width: int, height: int) -> str | None:
    """Why stored image bytes fail to decode to their recorded displayed size, or None."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                try:
                    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
                except Exception:  # broken EXIF: the pipeline counts it as upright
                    orientation = 1
                image.load()
                size = image.size
    except Exception as exc:  # any failure to decode is the finding
        return f"does not decode ({type(exc).__name__}: {_one_line(exc)})"
    shown = (size[1], size[0]) if orientation in (5, 6, 7, 8) else size
    if shown != (width, height):
        return f"decodes to {shown[0]}x{shown[1]}, the row says {width}x{height}"
    return None


def _hash_file(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _gzipped(path: str) -> bool:
    return path.endswith(".gz")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
