"""TFRecord shards of ``tf.train.Example`` records, written and read without TensorFlow.

One row is one ``tf.train.Example`` whose features are exactly the schema's fields,
typed from the schema (``schemas.Schema.tf_feature_spec()``)::

    string, binary        -> bytes_list (one value; strings as UTF-8)
    int32, int64, bool    -> int64_list (one value)
    float32               -> float_list (one value)
    list<float32>         -> float_list (any length; parse with VarLenFeature)

Records are framed as TensorFlow writes them: ``uint64 length``, masked CRC32C of
the length bytes, the data, masked CRC32C of the data (all little-endian).

The protobuf wire format is encoded and parsed here by hand: an Example is a handful
of length-delimited fields. That is about as fast as protobuf's C (upb) runtime on pair
rows (each image is copied once, straight into the shard), and needs neither TensorFlow
nor the optional ``tfrecord`` package. The parser accepts any valid layout (packed or
unpacked lists, any feature order, unknown fields), so shards written by TensorFlow read
too. Features are written in schema order, so the same rows always give the same bytes;
gzip output has no file name and mtime 0.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from typing import IO, Any

import google_crc32c
import numpy as np

from pairmill.errors import PairmillError
from pairmill.shards import register_writer
from schemas import Schema

GZIP_MAGIC = b"\x1f\x8b"
# Level of gzip shards: zlib's default, the one TensorFlow's GZIP option uses.
GZIP_LEVEL = 6
# Protobuf messages cannot exceed 2 GiB: a larger length means a corrupt header.
MAX_RECORD_BYTES = 2**31 - 1
# Streams are read at most this much at a time, so a bad length never allocates much.
_READ_CHUNK = 16 * 2**20

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_FLOAT = struct.Struct("<f")

# Feature kinds: the field number of each list inside tf.train.Feature's oneof.
BYTES_LIST, FLOAT_LIST, INT64_LIST = 1, 2, 3
KIND_NAMES = {BYTES_LIST: "bytes_list", FLOAT_LIST: "float_list", INT64_LIST: "int64_list"}
_KIND_OF_TYPE = {
    "string": BYTES_LIST,
    "binary": BYTES_LIST,
    "bool": INT64_LIST,
    "int32": INT64_LIST,
    "int64": INT64_LIST,
    "float32": FLOAT_LIST,
    "list<float32>": FLOAT_LIST,
}
_INT_RANGE = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1), "bool": (0, 1)}


class CorruptShardError(PairmillError):
    """A shard's bytes are damaged: bad length or data CRC, truncation, or an unparsable record.

    Args:
      message: what is wrong, with where.
      offset: byte offset of the damaged record (in the uncompressed stream), if known.
      record: index of the damaged record, if known.
    """

    def __init__(self, message: str, offset: int | None = None, record: int | None = None):
        super().__init__(message)
        self.offset = offset
        self.record = record


class SchemaMismatchError(CorruptShardError):
    """A record parses but its features are not exactly the schema's."""


# ---------------------------------------------------------------- CRC and framing


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC32C of `data`."""
    return _mask(google_crc32c.value(data))


def frame_records(records: Iterable[bytes]) -> bytes:
    """Frame serialized records as one TFRecord file body."""
    parts: list[bytes] = []
    for data in records:
        _frame_parts(parts, [data], len(data))
    return b"".join(parts)


def _frame_parts(out: list, parts: list, length: int) -> None:
    """Append the framing of one record made of `parts` (never joined: one copy at the end)."""
    header = _LENGTH.pack(length)
    crc = 0
    for part in parts:
        crc = google_crc32c.extend(crc, part)
    out.append(header)
    out.append(_CRC.pack(masked_crc(header)))
    out.extend(parts)
    out.append(_CRC.pack(_mask(crc)))


# ---------------------------------------------------------------- encoding


_VARINT1 = [bytes((i,)) for i in range(0x80)]


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _VARINT1[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_len(value: int) -> int:
    return 1 if value < 0x80 else 2 if value < 0x4000 else max(1, (value.bit_length() + 6) // 7)


# Binary values at least this long stay separate parts, joined once into the shard.
_SEPARATE_BYTES = 4096


class _FieldCodec:
    """Encodes one schema field as a serialized ``Features.feature`` map entry.

    ``encode(value)`` returns ``(head, big)``: the entry is ``head + big`` where
    ``big`` is a large binary value kept apart so it is copied only once, or None.
    """

    def __init__(self, name: str, type_: str, nullable: bool):
        self.name = name
        self.type = type_
        self.nullable = nullable
        self.kind = _KIND_OF_TYPE[type_]
        key = name.encode("utf-8")
        self.key = b"\x0a" + _varint(len(key)) + key  # MapEntry.key
        self.tag = _VARINT1[(self.kind << 3) | 2]  # Feature.<kind>_list
        self.encode = {
            "binary": self._binary,
            "string": self._string,
            "float32": self._float,
            "list<float32>": self._floats,
        }.get(type_, self._int)

    def _head(self, list_len: int) -> bytes:
        """Everything of the entry before the list's payload of `list_len` bytes."""
        feature_len = 1 + _varint_len(list_len) + list_len
        entry_len = len(self.key) + 1 + _varint_len(feature_len) + feature_len
        return b"".join(
            (
                b"\x0a",  # Features.feature (a map entry)
                _varint(entry_len),
                self.key,
                b"\x12",  # MapEntry.value: the Feature
                _varint(feature_len),
                self.tag,
                _varint(list_len),
            )
        )

    def _one(self, data: bytes) -> bytes:
        """A list holding one length-delimited value (bytes) or one packed payload."""
        lst = b"\x0a" + _varint(len(data))
        return self._head(len(lst) + len(data)) + lst + data

    def _none(self, value: Any) -> tuple[bytes, None]:
        if self.nullable:
            return self._head(0), None  # an empty list
        raise ValueError(f"field {self.name!r} ({self.type}) may not be None")

    def _wrong(self, value: Any, want: str) -> TypeError:
        return TypeError(f"field {self.name!r} wants {want}, got {type(value).__name__}")

    def _binary(self, value: Any) -> tuple[bytes, bytes | None]:
        if not isinstance(value, bytes):
            if value is None:
                return self._none(value)
            if not isinstance(value, (bytearray, memoryview)):
                raise self._wrong(value, "bytes")
            value = bytes(value)
        if len(value) < _SEPARATE_BYTES:
            return self._one(value), None
        lst = b"\x0a" + _varint(len(value))
        return self._head(len(lst) + len(value)) + lst, value

    def _string(self, value: Any) -> tuple[bytes, None]:
        if not isinstance(value, str):
            if value is None:
                return self._none(value)
            raise self._wrong(value, "str")
        return self._one(value.encode("utf-8")), None

    def _float(self, value: Any) -> tuple[bytes, None]:
        if value is None:
            return self._none(value)
        try:
            packed = _FLOAT.pack(value)
        except (struct.error, OverflowError) as exc:
            raise ValueError(f"field {self.name!r} (float32) cannot hold {value!r}") from exc
        return self._head(6) + b"\x0a\x04" + packed, None

    def _floats(self, value: Any) -> tuple[bytes, None]:
        if value is None:
            return self._none(value)
        data = np.asarray(value, dtype="<f4")
        if data.ndim != 1:
            raise ValueError(f"field {self.name!r} wants a list of floats, got shape {data.shape}")
        return (self._one(data.tobytes()) if data.size else self._head(0)), None

    def _int(self, value: Any) -> tuple[bytes, None]:
        if value is None:
            return self._none(value)
        if self.type == "bool" and not isinstance(value, (bool, np.bool_)):
            raise self._wrong(value, "bool")
        if not isinstance(value, (int, np.integer, np.bool_)):
            raise self._wrong(value, "int")
        number = int(value)
        low, high = _INT_RANGE[self.type]
        if not low <= number <= high:
            raise ValueError(f"field {self.name!r} ({self.type}) cannot hold {value!r}")
        # packed varint; a negative int64 is its 10-byte two's complement
        return self._one(_varint(number & 0xFFFFFFFFFFFFFFFF)), None


def _codecs(schema: Schema) -> list[_FieldCodec]:
    return [_FieldCodec(f.name, f.type, f.nullable) for f in schema.fields]


def _example_parts(row: dict[str, Any], codecs: list[_FieldCodec]) -> tuple[list, int]:
    """A serialized Example as parts (small fields joined, big binaries apart) and its length."""
    if len(row) != len(codecs):
        extra = sorted(set(row) - {c.name for c in codecs})
        if extra:
            raise ValueError(f"row has fields not in the schema: {', '.join(extra)}")
    parts: list = []
    small: list[bytes] = []
    total = 0
    for codec in codecs:
        try:
            value = row[codec.name]
        except KeyError:
            raise ValueError(f"row lacks field {codec.name!r}") from None
        head, big = codec.encode(value)
        small.append(head)
        total += len(head)
        if big is not None:
            parts.append(b"".join(small))
            parts.append(big)
            total += len(big)
            small = []
    if small:
        parts.append(b"".join(small))
    head = b"\x0a" + _varint(total)  # Example.features
    parts[0] = head + parts[0] if parts else head
    if not parts:
        parts.append(head)
    return parts, len(head) + total


def encode_example(row: dict[str, Any], schema: Schema) -> bytes:
    """One row as a serialized ``tf.train.Example`` (features in schema order)."""
    parts, _ = _example_parts(row, _codecs(schema))
    return b"".join(parts)


def gzip_bytes(data: bytes, level: int = GZIP_LEVEL) -> bytes:
    """A gzip member with no file name and mtime 0: the same data always gives the same bytes."""
    xfl = b"\x02" if level == 9 else b"\x04" if level == 1 else b"\x00"
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + xfl + b"\xff"
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(data) + compressor.flush()
    return header + body + struct.pack("<II", zlib.crc32(data) & _U32, len(data) & _U32)


@register_writer
class TFRecordWriter:
    """TFRecord shards of ``tf.train.Example`` records (TensorFlow's own framing).

    Args:
      compression: "none" or "gzip" (read with ``TFRecordDataset(compression_type="GZIP")``).
    """

    format = "tfrecord"

    def __init__(self, compression: str = "none"):
        if compression not in ("none", "gzip"):
            raise ValueError(f"tfrecord compression must be none or gzip, got {compression!r}")
        self.compression = compression

    @property
    def extension(self) -> str:
        return ".tfrecord.gz" if self.compression == "gzip" else ".tfrecord"

    def encode(self, rows: list[dict[str, Any]], schema: Schema) -> bytes:
        codecs = _codecs(schema)
        out: list = []
        for row in rows:
            parts, length = _example_parts(row, codecs)
            _frame_parts(out, parts, length)
        data = b"".join(out)
        return gzip_bytes(data) if self.compression == "gzip" else data


# ---------------------------------------------------------------- framing: reading


def iter_records(stream_or_bytes, check_crc: bool = True) -> Iterator[bytes]:
    """The records of a TFRecord body (bytes or a binary stream), CRCs checked.

    Raises:
      CorruptShardError: with the record's byte offset, on a bad length CRC, a bad
        data CRC, a truncated record, or an unreadable (e.g. broken gzip) stream.
    """
    if isinstance(stream_or_bytes, (bytes, bytearray, memoryview)):
        yield from _iter_buffer(bytes(stream_or_bytes), check_crc)
    else:
        yield from _iter_stream(stream_or_bytes, check_crc)


def _check_header(header, offset: int, index: int, check_crc: bool) -> int:
    (length,) = _LENGTH.unpack_from(header, 0)
    if check_crc:
        (stored,) = _CRC.unpack_from(header, 8)
        if masked_crc(header[:8]) != stored:
            raise CorruptShardError(
                f"record {index} at byte {offset}: bad length CRC", offset, index
            )
    if length > MAX_RECORD_BYTES:
        raise CorruptShardError(
            f"record {index} at byte {offset}: implausible length {length}", offset, index
        )
    return length


def _check_data(data, stored_crc, offset: int, index: int, check_crc: bool) -> None:
    if check_crc and masked_crc(data) != _CRC.unpack_from(stored_crc, 0)[0]:
        raise CorruptShardError(f"record {index} at byte {offset}: bad data CRC", offset, index)


def _truncated(offset: int, index: int, what: str, have: int, want: int) -> CorruptShardError:
    return CorruptShardError(
        f"record {index} at byte {offset}: truncated {what} ({have} of {want} bytes)",
        offset,
        index,
    )


def _iter_buffer(buf: bytes, check_crc: bool) -> Iterator[bytes]:
    offset, index, size = 0, 0, len(buf)
    while offset < size:
        if size - offset < 12:
            raise _truncated(offset, index, "header", size - offset, 12)
        length = _check_header(buf[offset : offset + 12], offset, index, check_crc)
        start = offset + 12
        end = start + length
        if end + 4 > size:
            have = max(0, size - start)
            raise _truncated(offset, index, "record", have, length + 4)
        data = buf[start:end]
        _check_data(data, buf[end : end + 4], offset, index, check_crc)
        yield data
        offset, index = end + 4, index + 1


def _read_exact(stream: IO[bytes], n: int, offset: int, index: int) -> bytes:
    """`n` bytes, or fewer only at the end of the stream (short reads are retried)."""
    import gzip

    parts: list[bytes] = []
    got = 0
    try:
        while got < n:
            data = stream.read(min(n - got, _READ_CHUNK))
            if not data:
                break
            parts.append(data)
            got += len(data)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise CorruptShardError(
            f"record {index} at byte {offset}: unreadable stream ({exc})", offset, index
        ) from exc
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _iter_stream(stream: IO[bytes], check_crc: bool) -> Iterator[bytes]:
    offset, index = 0, 0
    while True:
        header = _read_exact(stream, 12, offset, index)
        if not header:
            return
        if len(header) < 12:
            raise _truncated(offset, index, "header", len(header), 12)
        length = _check_header(header, offset, index, check_crc)
        data = _read_exact(stream, length, offset, index)
        crc = _read_exact(stream, 4, offset, index) if len(data) == length else b""
        if len(crc) < 4:
            raise _truncated(offset, index, "record", len(data) + len(crc), length + 4)
        _check_data(data, crc, offset, index, check_crc)
        yield data
        offset, index = offset + 16 + length, index + 1


# ---------------------------------------------------------------- parsing Examples


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise IndexError("truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _delimited(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(start, stop) of a length-delimited value whose length varint is at `pos`."""
    length = buf[pos] if pos < end else 0x80
    if length < 0x80:
        pos += 1
    else:
        length, pos = _read_varint(buf, pos, end)
    stop = pos + length
    if stop > end:
        raise IndexError("a field runs past the end of its message")
    return pos, stop


def _skip(buf: bytes, pos: int, end: int, wire: int) -> int:
    """The position after an unknown field's value (protobuf readers skip unknown fields)."""
    if wire == 0:
        return _read_varint(buf, pos, end)[1]
    if wire == 2:
        return _delimited(buf, pos, end)[1]
    if wire in (1, 5):
        pos += 8 if wire == 1 else 4
        if pos > end:
            raise IndexError("a fixed-size field runs past the end")
        return pos
    raise IndexError(f"unsupported wire type {wire}")


def _tag(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    tag = buf[pos]
    if tag < 0x80:
        return tag, pos + 1
    return _read_varint(buf, pos, end)


def parse_example(data: bytes, arrays: bool = False) -> dict[str, tuple[int, Any]]:
    """A serialized ``tf.train.Example`` as {feature name: (kind, values)}.

    Values are bytes for bytes_list, Python floats (float32-exact) for float_list
    and ints for int64_list (float_list as a float32 numpy array with `arrays`); kind is 0
    for a Feature with no list set. Accepts
    packed and unpacked lists and any field order, as protobuf readers do.

    Raises:
      IndexError, UnicodeDecodeError: the bytes are not a valid Example.
    """
    buf = data if isinstance(data, bytes) else bytes(data)
    features: dict[str, tuple[int, Any]] = {}
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _tag(buf, pos, end)
        if tag != 0x0A:  # Example.features; anything else is unknown
            pos = _skip(buf, pos, end, tag & 7)
            continue
        start, pos = _delimited(buf, pos, end)
        _parse_features(buf, start, pos, features, arrays)
    return features


def _parse_features(buf: bytes, pos: int, end: int, features: dict, arrays: bool) -> None:
    # The hot loop of reading: one-byte tags and lengths are read inline, longer ones and
    # anything unusual through the general helpers.
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag != 0x0A:  # Features.feature map entries; skip anything else
            pos = _skip(buf, pos, end, _read_varint(buf, pos - 1, end)[0] & 7)
            continue
        entry, pos = _delimited(buf, pos, end)
        key, kind, values = "", 0, []
        while entry < pos:
            tag = buf[entry]
            if tag == 0x0A or tag == 0x12:
                length = buf[entry + 1] if entry + 1 < pos else 0x80
                if length < 0x80:
                    start, entry = entry + 2, entry + 2 + length
                    if entry > pos:
                        raise IndexError("a field runs past the end of its message")
                else:
                    start, entry = _delimited(buf, entry + 1, pos)
                if tag == 0x0A:
                    key = buf[start:entry].decode("utf-8")
                else:
                    kind, values = _parse_feature(buf, start, entry, arrays)
            else:
                tag, entry = _tag(buf, entry, pos)
                entry = _skip(buf, entry, pos, tag & 7)
        features[key] = (kind, values)


def _parse_feature(buf: bytes, pos: int, end: int, arrays: bool) -> tuple[int, Any]:
    kind, values = 0, []
    while pos < end:
        tag = buf[pos]
        if tag not in (0x0A, 0x12, 0x1A):
            tag, pos = _tag(buf, pos, end)
            pos = _skip(buf, pos, end, tag & 7)
            continue
        start, pos = _delimited(buf, pos + 1, end)
        kind = tag >> 3  # a oneof: the last list set wins
        if kind == BYTES_LIST and pos > start and buf[start] == 0x0A:
            # one bytes value filling the list: what every writer produces
            first, stop = _delimited(buf, start + 1, pos)
            if stop == pos:
                values = [buf[first:stop]]
                continue
        values = _parse_list(buf, start, pos, kind, arrays)
    return kind, values


def _parse_list(buf: bytes, pos: int, end: int, kind: int, arrays: bool) -> Any:
    values: list = []
    chunks: list[np.ndarray] = []  # packed floats, in order with the unpacked ones
    while pos < end:
        tag, pos = _tag(buf, pos, end)
        if tag == 0x0A:  # value, length-delimited: a bytes value or a packed list
            start, pos = _delimited(buf, pos, end)
            if kind == BYTES_LIST:
                values.append(buf[start:pos])
            elif kind == FLOAT_LIST:
                if (pos - start) % 4:
                    raise IndexError("a packed float list whose length is not a multiple of 4")
                if values:
                    chunks.append(np.asarray(values, "<f4"))
                    values = []
                chunks.append(np.frombuffer(buf, "<f4", (pos - start) // 4, start))
            else:
                while start < pos:
                    value, start = _read_varint(buf, start, pos)
                    values.append(value - 2**64 if value >= 2**63 else value)
        elif tag == 0x0D and kind == FLOAT_LIST:  # one unpacked float
            if pos + 4 > end:
                raise IndexError("a float runs past the end of its list")
            values.append(_FLOAT.unpack_from(buf, pos)[0])
            pos += 4
        elif tag == 0x08 and kind == INT64_LIST:  # one unpacked int64
            value, pos = _read_varint(buf, pos, end)
            values.append(value - 2**64 if value >= 2**63 else value)
        else:
            pos = _skip(buf, pos, end, tag & 7)
    if kind != FLOAT_LIST:
        return values
    if values:
        chunks.append(np.asarray(values, "<f4"))
    floats = np.concatenate(chunks) if len(chunks) > 1 else chunks[0] if chunks else None
    if floats is None:
        return np.zeros(0, np.float32) if arrays else []
    return floats.astype(np.float32) if arrays else floats.tolist()


def row_from_example(
    data: bytes, schema: Schema | None = None, arrays: bool = False
) -> dict[str, Any]:
    """A row (schema field order, the schema's Python types) from a serialized Example.

    Without `schema`, the pair schema version whose features the Example has
    (``pair_v1``, or ``pair_v2`` with patch tokens).

    With `arrays`, ``list<float32>`` fields come back as float32 numpy arrays instead of
    lists of floats (what a data loader wants; the values are the same).

    Raises:
      SchemaMismatchError: a feature is missing, unexpected, of the wrong kind or
        holds the wrong number of values.
      CorruptShardError: the bytes are not a valid Example.
    """
    try:
        features = parse_example(data, arrays)
    except (IndexError, UnicodeDecodeError) as exc:
        raise CorruptShardError(f"record is not a valid tf.train.Example ({exc})") from exc
    schema = schema or pair_schema_of(features)
    names = schema.names
    if len(features) != len(names) or set(features) != set(names):
        missing = [n for n in names if n not in features]
        extra = sorted(set(features) - set(names))
        what = []
        if missing:
            what.append(f"missing feature(s) {', '.join(missing)}")
        if extra:
            what.append(f"unexpected feature(s) {', '.join(extra)}")
        raise SchemaMismatchError(f"Example does not match {schema.id}: {'; '.join(what)}")
    row: dict[str, Any] = {}
    for field in schema.fields:
        kind, values = features[field.name]
        want = _KIND_OF_TYPE[field.type]
        if kind != want and not (kind == 0 and len(values) == 0):
            got = KIND_NAMES.get(kind, "no list")
            raise SchemaMismatchError(
                f"feature {field.name} is a {got}, {schema.id} wants a {KIND_NAMES[want]}"
            )
        row[field.name] = _python_value(field, values, schema.id)
    return row


def pair_schema_of(features) -> Schema:
    """The pair schema version with exactly these feature names; else the current one
    (whose check then names what is missing or unexpected)."""
    import schemas

    return schemas.matching("pair", features) or schemas.load("pair")


def _python_value(field, values, schema_id: str) -> Any:
    if field.type == "list<float32>":
        return values
    if len(values) != 1:
        if len(values) == 0 and field.nullable:
            return None
        raise SchemaMismatchError(
            f"feature {field.name} holds {len(values)} values, {schema_id} wants 1"
        )
    value = values[0]
    if field.type == "binary":
        return value
    if field.type == "string":
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptShardError(f"feature {field.name} is not UTF-8 ({exc})") from exc
    if field.type in _INT_RANGE:
        low, high = _INT_RANGE[field.type]
        if not low <= value <= high:
            raise SchemaMismatchError(f"feature {field.name} ({field.type}) holds {value}")
        return bool(value) if field.type == "bool" else value
    return float(value)  # float32-exact


# ---------------------------------------------------------------- files


def is_gzip(url: str, head: bytes = b"") -> bool:
    """Whether a shard is gzip: by its suffix, else by magic bytes that are not a valid header."""
    if url.endswith(".gz"):
        return True
    if not head.startswith(GZIP_MAGIC):
        return False
    # A plain TFRecord could start with 1f 8b as the low bytes of a length: trust its CRC.
    return not (len(head) >= 12 and masked_crc(head[:8]) == _CRC.unpack_from(head, 8)[0])


class _Prefixed:
    """A read-only stream: bytes already read from `stream`, then the rest of it."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self._head = head
        self._stream = stream

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(n)
        if 0 <= n <= len(self._head):
            out, self._head = self._head[:n], self._head[n:]
            return out
        out, self._head = self._head, b""
        return out + self._stream.read(-1 if n < 0 else n - len(out))


def open_records(handle: IO[bytes], url: str = "") -> IO[bytes]:
    """The record stream of an open shard: gunzipped when the shard is gzip."""
    import gzip

    if not url.endswith(".gz"):
        head = handle.read(12)
        stream = _Prefixed(head, handle)
        if not is_gzip(url, head):
            return stream  # type: ignore[return-value]
        handle = stream  # type: ignore[assignment]
    return gzip.GzipFile(fileobj=handle, mode="rb")  # type: ignore[return-value]


def read_rows(
    url: str, schema: Schema | None = None, check_crc: bool = True, arrays: bool = False
) -> Iterator[dict]:
    """Stream the rows of a TFRecord shard (local path or fsspec URL; gzip detected).

    Default schema: the pair schema version of the first record (every record must have
    it). `arrays`: see `row_from_example`.

    Raises:
      CorruptShardError: naming the shard and the damaged record's byte offset
        (in the uncompressed stream for gzip shards).
    """
    import fsspec

    import schemas

    with fsspec.open(url, "rb") as raw:
        stream = open_records(raw, url)
        offset = 0
        try:
            for index, data in enumerate(iter_records(stream, check_crc)):
                try:
                    row = row_from_example(data, schema, arrays)
                    if schema is None:  # the rest must have the first record's version
                        schema = schemas.matching("pair", row)
                    yield row
                except CorruptShardError as exc:
                    message = f"record {index} at byte {offset}: {exc}"
                    raise type(exc)(message, offset, index) from exc
                offset += 16 + len(data)
        except CorruptShardError as exc:
            raise type(exc)(f"{url}: {exc}", exc.offset, exc.record) from None
