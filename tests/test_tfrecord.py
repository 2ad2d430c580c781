"""TFRecord pair shards: round trips, byte-level framing, corruption, and an end-to-end build."""

from __future__ import annotations

import gzip
import io
import struct

import google_crc32c
import numpy as np
import pyarrow.parquet as pq
import pytest

import schemas
from pairmill import tfrecord
from pairmill.shards import get_writer
from pairmill.tfrecord import CorruptShardError, TFRecordWriter, iter_records, row_from_example
from pipelines import build_pairs

PAIR = schemas.load("pair")


def cached_run(tmp_path_factory, crawl, name: str, *flags: str):
    """A build of the sample crawl, made once per session (never modify it: copy it)."""
    out = tmp_path_factory.getbasetemp() / "pairmill-runs" / name
    if not (out / "manifest.json").exists():
        argv = [str(crawl), "--out", str(out), "--encoder", "tiny", "--device", "cpu"]
        build_pairs.run([*argv, "--overwrite", *flags])
    return out


@pytest.fixture(scope="module")
def pair_rows(jpeg_of):
    """Pair rows holding real JPEGs of about 100 KB and unit float32 embeddings."""
    rng = np.random.default_rng(7)
    names = ["astronaut", "coffee", "rocket", "chelsea", "camera", "retina"]
    images = {name: jpeg_of(name, (480, 480), quality=95) for name in names}
    rows = []
    for k in range(12):
        cond, target = names[k % 6], names[(k + 1) % 6]
        embeddings = rng.standard_normal((2, 384)).astype(np.float32)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        similarity = np.float32(np.dot(embeddings[0].astype(np.float64), embeddings[1]))
        rows.append(
            {
                "pair_id": f"pair-{k:03d}",
                "episode_id": f"episode-{k // 3}",
                "page_url": f"https://example.org/galerie/{k}?q=ünïcödé",
                "cond_image_id": f"img-{k}-a",
                "cond_url": f"https://cdn.example.org/{cond}.jpg",
                "cond_sha256": "a" * 64,
                "cond_width": 480,
                "cond_height": 480,
                "cond_image": images[cond],
                "cond_embedding": embeddings[0].tolist(),
                "target_image_id": f"img-{k}-b",
                "target_url": f"https://cdn.example.org/{target}.jpg",
                "target_sha256": "b" * 64,
                "target_width": 2**31 - 1,
                "target_height": 1,
                "target_image": images[target],
                "target_embedding": embeddings[1].tolist(),
                "similarity": float(similarity),
                "encoder": "tiny",
            }
        )
    assert min(len(image) for image in images.values()) > 40_000
    return rows


# ---------------------------------------------------------------- an independent reader


def independent_records(data: bytes) -> list[bytes]:
    """TFRecord framing parsed here (not by pairmill), every masked CRC32C checked."""

    def masked(chunk: bytes) -> int:
        crc = int.from_bytes(google_crc32c.Checksum(chunk).digest(), "big")
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32

    records, pos = [], 0
    while pos < len(data):
        length_bytes = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert length_crc == masked(length_bytes), f"length CRC at {pos}"
        record = data[pos + 12 : pos + 12 + length]
        (data_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert data_crc == masked(record), f"data CRC at {pos}"
        records.append(record)
        pos += 16 + length
    assert pos == len(data)
    return records


def test_independent_reader_checks_every_crc_and_parses_with_the_example_proto(pair_rows):
    from tfrecord import example_pb2

    data = TFRecordWriter().encode(pair_rows, PAIR)
    records = independent_records(data)
    assert len(records) == len(pair_rows)
    spec = PAIR.tf_feature_spec()
    list_of = {"string": "bytes_list", "int64": "int64_list", "float32": "float_list"}
    for record, row in zip(records, pair_rows, strict=True):
        example = example_pb2.Example.FromString(record)
        assert example.ByteSize() == len(record)  # nothing unknown or left over
        features = example.features.feature
        assert set(features) == set(PAIR.names)
        for field in PAIR.fields:
            kind, dtype = spec[field.name]
            feature = features[field.name]
            assert feature.WhichOneof("kind") == list_of[dtype], field.name
            values = list(getattr(feature, list_of[dtype]).value)
            if kind == "FixedLenFeature":
                assert len(values) == 1, field.name
            expected = row[field.name]
            if field.type == "string":
                assert values == [expected.encode()]
            elif field.type == "list<float32>":
                assert (
                    np.array(values, np.float32).tobytes()
                    == np.array(expected, np.float32).tobytes()
                )
            else:
                assert values == [expected], field.name
        # protobuf's own (deterministic, key-sorted) serialization reads back the same
        assert row_from_example(example.SerializeToString(deterministic=True), PAIR) == row


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_round_trip_is_exact_and_deterministic(pair_rows, tmp_path, compression):
    writer = get_writer("tfrecord", compression=compression)
    data = writer.encode(pair_rows, PAIR)
    assert writer.encode(pair_rows, PAIR) == data  # the same rows give the same bytes
    path = tmp_path / f"pairs-00000-of-00001{writer.extension}"
    path.write_bytes(data)
    back = list(tfrecord.read_rows(str(path), PAIR))
    assert back == pair_rows
    for got, want in zip(back, pair_rows, strict=True):
        assert list(got) == PAIR.names  # schema order
        assert isinstance(got["cond_image"], bytes) and got["cond_image"] == want["cond_image"]
        assert isinstance(got["page_url"], str) and isinstance(got["cond_width"], int)
        for side in ("cond_embedding", "target_embedding"):
            assert np.array(got[side], np.float32).tobytes() == (
                np.array(want[side], np.float32).tobytes()
            )
        assert np.float32(got["similarity"]) == got["similarity"]  # float32-exact
    if compression == "gzip":
        assert writer.extension == ".tfrecord.gz"
        assert data[:2] == b"\x1f\x8b" and data[3] == 0 and data[4:8] == b"\0\0\0\0"  # no name
        plain = gzip.decompress(data)
        assert plain == TFRecordWriter().encode(pair_rows, PAIR)
        assert [row_from_example(r, PAIR) for r in iter_records(plain)] == pair_rows
    else:
        assert writer.extension == ".tfrecord"
        assert [row_from_example(r, PAIR) for r in iter_records(data)] == pair_rows


def test_other_schemas_keep_bools_negative_ints_and_nulls():
    similarity = schemas.load("similarity")
    rows = [
        {
            "pair_id": "p",
            "episode_id": "e",
            "cond_image_id": "a",
            "target_image_id": "b",
            "similarity": -0.25,
            "kept": flag,
        }
        for flag in (True, False)
    ]
    data = TFRecordWriter().encode(rows, similarity)
    back = [row_from_example(r, similarity) for r in iter_records(data)]
    assert back == rows and all(type(r["kept"]) is bool for r in back)

    reject = schemas.load("reject")
    row = {
        "image_url": None,
        "page_url": "https://x.org/",
        "episode_id": None,
        "reason": "empty",
        "detail": "",
        "source": "crawl.parquet",
        "row": -(2**63),
    }
    data = TFRecordWriter().encode([row], reject)
    assert [row_from_example(r, reject) for r in iter_records(data)] == [row]


def test_reader_accepts_any_valid_protobuf_layout(pair_rows):
    """Unpacked lists, any feature order and unknown fields parse as protobuf would."""

    def field(number: int, payload: bytes) -> bytes:
        return bytes([number << 3 | 2, len(payload)]) + payload

    def entry(name: str, feature: bytes) -> bytes:
        return field(1, field(1, name.encode()) + field(2, feature))

    unpacked_floats = b"".join(b"\x0d" + struct.pack("<f", v) for v in (0.5, -0.25))
    features = b"".join(
        [
            entry("kept", field(3, b"\x08\x01")),  # one unpacked int64
            entry("similarity", field(2, unpacked_floats[5:])),  # one unpacked float
            entry("target_image_id", field(1, field(1, b"b"))),
            entry("cond_image_id", field(1, field(1, b"a"))),
            entry("episode_id", field(1, field(1, b"e"))),
            entry("pair_id", field(1, field(1, b"p"))),
        ]
    )
    example = field(1, features) + b"\x10\x07"  # + an unknown varint field 2
    row = row_from_example(example, schemas.load("similarity"))
    assert row == {
        "pair_id": "p",
        "episode_id": "e",
        "cond_image_id": "a",
        "target_image_id": "b",
        "similarity": -0.25,
        "kept": True,
    }
    assert tfrecord.parse_example(field(1, entry("x", field(2, unpacked_floats)))) == {
        "x": (tfrecord.FLOAT_LIST, [0.5, -0.25])
    }
    # arrays=True: embeddings as float32 arrays, everything else unchanged
    data = tfrecord.encode_example(pair_rows[0], PAIR)
    row = row_from_example(data, PAIR, arrays=True)
    assert row["cond_embedding"].dtype == np.float32
    assert row["cond_embedding"].tolist() == pair_rows[0]["cond_embedding"]
    assert {k: v for k, v in row.items() if not k.endswith("embedding")} == {
        k: v for k, v in pair_rows[0].items() if not k.endswith("embedding")
    }


def test_writer_rejects_bad_options_and_rows(pair_rows):
    with pytest.raises(ValueError, match="none or gzip"):
        TFRecordWriter(compression="zstd")
    row = dict(pair_rows[0])
    del row["encoder"]
    with pytest.raises(ValueError, match="encoder"):
        TFRecordWriter().encode([row], PAIR)
    with pytest.raises(TypeError, match="cond_image"):
        TFRecordWriter().encode([{**pair_rows[0], "cond_image": "text"}], PAIR)
    with pytest.raises(ValueError, match="cond_width"):
        TFRecordWriter().encode([{**pair_rows[0], "cond_width": 2**31}], PAIR)
    with pytest.raises(ValueError, match="extra"):
        TFRecordWriter().encode([{**pair_rows[0], "extra": 1}], PAIR)


def test_examples_must_hold_exactly_the_schema_features(pair_rows):
    from tfrecord import example_pb2

    example = example_pb2.Example.FromString(tfrecord.encode_example(pair_rows[0], PAIR))
    del example.features.feature["encoder"]
    example.features.feature["surprise"].int64_list.value.append(1)
    with pytest.raises(tfrecord.SchemaMismatchError, match="missing feature.*encoder.*surprise"):
        row_from_example(example.SerializeToString(), PAIR)
    example = example_pb2.Example.FromString(tfrecord.encode_example(pair_rows[0], PAIR))
    example.features.feature["similarity"].bytes_list.value.append(b"x")
    with pytest.raises(tfrecord.SchemaMismatchError, match="similarity is a bytes_list"):
        row_from_example(example.SerializeToString(), PAIR)
    with pytest.raises(CorruptShardError, match="not a valid tf.train.Example"):
        row_from_example(b"\x0a\xff\xff\x03garbage", PAIR)


# ---------------------------------------------------------------- corruption


def record_offsets(data: bytes) -> list[int]:
    offsets, pos = [], 0
    while pos < len(data):
        offsets.append(pos)
        pos += 16 + struct.unpack_from("<Q", data, pos)[0]
    return offsets


def flipped(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x40
    return bytes(out)


@pytest.mark.parametrize("as_stream", [False, True])
def test_corruption_names_the_record_offset(pair_rows, as_stream):
    data = TFRecordWriter().encode(pair_rows[:4], PAIR)
    offsets = record_offsets(data)
    third = offsets[2]

    def read(blob, check_crc=True):
        return list(iter_records(io.BytesIO(blob) if as_stream else blob, check_crc))

    cases = [
        (flipped(data, third + 12 + 5000), "bad data CRC"),  # inside an image
        (flipped(data, third + 1), "bad length CRC"),  # the length itself
        (flipped(data, third + 9), "bad length CRC"),  # the length's CRC
        (flipped(data, offsets[3] - 2), "bad data CRC"),  # the data's CRC
        (data[: third + 100], "truncated record"),
        (data[: third + 7], "truncated header"),
    ]
    for blob, what in cases:
        with pytest.raises(CorruptShardError, match=f"record 2 at byte {third}: {what}") as exc:
            read(blob)
        assert exc.value.offset == third and exc.value.record == 2
    # without CRC checks a flipped image byte goes through
    assert len(read(flipped(data, third + 12 + 5000), check_crc=False)) == 4


def test_read_rows_names_the_file_and_catches_broken_gzip(pair_rows, tmp_path):
    data = TFRecordWriter().encode(pair_rows[:3], PAIR)
    second = record_offsets(data)[1]
    plain = tmp_path / "bad.tfrecord"
    plain.write_bytes(flipped(data, second + 40))
    with pytest.raises(CorruptShardError, match=f"bad.tfrecord: record 1 at byte {second}: bad"):
        list(tfrecord.read_rows(str(plain), PAIR))
    zipped = tmp_path / "cut.tfrecord.gz"
    zipped.write_bytes(tfrecord.gzip_bytes(data)[:-5000])
    with pytest.raises(CorruptShardError, match="cut.tfrecord.gz: record .* unreadable stream"):
        list(tfrecord.read_rows(str(zipped), PAIR))


def test_gzip_is_detected_by_magic_bytes_but_not_fooled_by_a_length(tmp_path, pair_rows):
    data = TFRecordWriter().encode(pair_rows[:2], PAIR)
    unnamed = tmp_path / "pairs.tfrecord"
    unnamed.write_bytes(tfrecord.gzip_bytes(data))
    assert list(tfrecord.read_rows(str(unnamed), PAIR)) == pair_rows[:2]
    # a plain record of length 0x8b1f starts with the gzip magic bytes
    tricky = tfrecord.frame_records([b"x" * 0x8B1F])
    assert tricky[:2] == tfrecord.GZIP_MAGIC
    stream = tfrecord.open_records(io.BytesIO(tricky), "tricky.tfrecord")
    assert list(iter_records(stream)) == [b"x" * 0x8B1F]


# ---------------------------------------------------------------- a real build


def test_tfrecord_build_reads_back_equal_to_the_parquet_build(sample_crawl, tmp_path_factory):
    parquet_run = cached_run(tmp_path_factory, sample_crawl, "parquet")
    tf_run = cached_run(
        tmp_path_factory,
        sample_crawl,
        "tfrecord-gzip",
        "--format",
        "tfrecord",
        "--compression",
        "gzip",
        "--shard-rows",
        "16",
    )
    import json

    manifest = json.loads((tf_run / "manifest.json").read_text())
    table = manifest["tables"]["pairs"]
    assert table["format"] == "tfrecord" and table["options"] == {"compression": "gzip"}
    assert len(table["shards"]) > 1
    tf_rows = []
    for shard in table["shards"]:
        assert shard["path"].endswith(".tfrecord.gz")
        data = gzip.decompress((tf_run / shard["path"]).read_bytes())
        assert len(independent_records(data)) == shard["rows"]
        tf_rows += list(tfrecord.read_rows(str(tf_run / shard["path"])))
    parquet_rows = pq.read_table(parquet_run / "pairs").to_pylist()
    assert parquet_rows and len(tf_rows) == len(parquet_rows) == table["rows"]

    def by_id(rows):
        return sorted(rows, key=lambda row: row["pair_id"])

    for got, want in zip(by_id(tf_rows), by_id(parquet_rows), strict=True):
        assert got == want
        for side in ("cond_embedding", "target_embedding"):
            assert np.array(got[side], np.float32).tobytes() == (
                np.array(want[side], np.float32).tobytes()
            )


# ---------------------------------------------------------------- the schema README


def test_schema_readme_documents_every_pair_feature_as_derived():
    """schemas/README.md's feature table and TF snippet match Schema.tf_feature_spec()."""
    import re
    from pathlib import Path

    text = (Path(schemas.__file__).parent / "README.md").read_text()
    section = text.split("### TFRecord feature spec (pair_v1)", 1)[1].split("```python", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            table[cells[0].strip("`")] = (cells[1], cells[2])
    spec = PAIR.tf_feature_spec()
    assert list(table) == PAIR.names
    assert table == spec

    snippet = text.split("FEATURES = {", 1)[1].split("}", 1)[0]
    parsed = {}
    for name, fixed, var in re.findall(
        r'"(\w+)": tf\.io\.(?:FixedLenFeature\(\[\], tf\.(\w+)\)|VarLenFeature\(tf\.(\w+)\))',
        snippet,
    ):
        parsed[name] = ("FixedLenFeature", fixed) if fixed else ("VarLenFeature", var)
    assert parsed == spec
    assert 'compression_type="GZIP"' in text and "pairmill.schema" in text


def test_schema_readme_documents_the_v2_token_features():
    """The pair_v2 table lists exactly the features v2 adds to v1, with their derived spec."""
    from pathlib import Path

    text = (Path(schemas.__file__).parent / "README.md").read_text()
    section = text.split("## Patch tokens (`pair_v2`, `image_v2`)", 1)[1].split("```", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            table[cells[0].strip("`")] = (cells[1], cells[2])
    v1, v2 = schemas.load("pair_v1"), schemas.load("pair_v2")
    assert v2.names[: len(v1.names)] == v1.names
    added = v2.names[len(v1.names) :]
    assert list(table) == added
    spec = v2.tf_feature_spec()
    assert table == {name: spec[name] for name in added}
