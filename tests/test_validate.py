"""`pairmill validate`: clean runs pass; each kind of damage is one precise line."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest

import schemas
from pairmill import tfrecord
from pairmill.cli import main
from pairmill.errors import InputError
from pairmill.shards import get_writer
from pairmill.validate import summary_lines, validate_run
from pipelines import build_pairs

RUNS = {
    "parquet": (),
    "tfrecord": ("--format", "tfrecord", "--shard-rows", "16"),
    "tfrecord-gzip": ("--format", "tfrecord", "--compression", "gzip", "--shard-rows", "16"),
}


def cached_run(tmp_path_factory, crawl, name: str):
    """A build of the sample crawl, made once per session (never modify it: copy it)."""
    out = tmp_path_factory.getbasetemp() / "pairmill-runs" / name
    if not (out / "manifest.json").exists():
        argv = [str(crawl), "--out", str(out), "--encoder", "tiny", "--device", "cpu"]
        build_pairs.run([*argv, "--overwrite", *RUNS[name]])
    return out


@pytest.fixture
def run_copy(sample_crawl, tmp_path_factory, tmp_path):
    """A private copy of a named run, free to damage."""

    def copy(name: str):
        return shutil.copytree(cached_run(tmp_path_factory, sample_crawl, name), tmp_path / name)

    return copy


def manifest_of(run) -> dict:
    return json.loads((run / "manifest.json").read_text())


def first_pair_shard(run) -> str:
    return manifest_of(run)["tables"]["pairs"]["shards"][0]["path"]


def rewrite_pairs(run, change) -> str:
    """Rewrite the first pair shard with `change(rows)` applied, and update the manifest so that
    only the content is wrong (size and sha256 match again)."""
    manifest = manifest_of(run)
    table = manifest["tables"]["pairs"]
    shard = table["shards"][0]
    path = run / shard["path"]
    schema = schemas.load(table["schema"])
    if table["format"] == "parquet":
        rows = pq.read_table(path).to_pylist()
    else:
        rows = list(tfrecord.read_rows(str(path), schema))
    change(rows)
    data = get_writer(table["format"], **table["options"]).encode(rows, schema)
    path.write_bytes(data)
    table["bytes"] += len(data) - shard["bytes"]
    shard.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (run / "manifest.json").write_text(json.dumps(manifest))
    return shard["path"]


def problems(result) -> list[tuple[str, str]]:
    return [(p["shard"], p["problem"]) for p in result["problems"]]


@pytest.mark.parametrize("name", list(RUNS))
def test_clean_runs_pass(run_copy, name, capsys):
    run = run_copy(name)
    manifest = manifest_of(run)
    result = validate_run(str(run), sample=3)
    assert result["ok"], result["problems"]
    assert result["shards_checked"] == sum(len(t["shards"]) for t in manifest["tables"].values())
    assert result["rows"] == {table: t["rows"] for table, t in manifest["tables"].items()}
    assert result["rows_checked"] == sum(result["rows"].values())
    pair_shards = len(manifest["tables"]["pairs"]["shards"])
    assert 0 < result["images_decoded"] <= 2 * 3 * pair_shards
    assert validate_run(str(run), sample=3) == result  # the sample is deterministic

    with pytest.raises(SystemExit) as exc:
        main(["validate", str(run)])
    assert exc.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    pairs = manifest["counts"]["kept_pairs"]
    assert len(lines) == 1 and lines[0].startswith(f"OK: {run}: {result['shards_checked']} shards")
    assert f"{pairs} pair rows" in lines[0] and lines[0].endswith("images decoded)")


def test_deleted_shard(run_copy):
    run = run_copy("tfrecord")
    shard = manifest_of(run)["tables"]["pairs"]["shards"][1]
    (run / shard["path"]).unlink()
    result = validate_run(str(run))
    assert problems(result) == [
        (shard["path"], f"missing (manifest.json lists it with {shard['rows']} rows)")
    ]


def test_flipped_byte_in_a_parquet_shard_breaks_its_sha256(run_copy):
    run = run_copy("parquet")
    shard = manifest_of(run)["tables"]["similarities"]["shards"][0]
    path = run / shard["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    result = validate_run(str(run))
    found = problems(result)
    assert found[0][0] == shard["path"] and found[0][1].startswith("sha256 mismatch: file ")
    assert f"manifest.json {shard['sha256'][:12]}…" in found[0][1]
    assert {where for where, _ in found} == {shard["path"]}


def test_flipped_byte_inside_a_tfrecord_record_fails_its_crc_and_sha256(run_copy):
    run = run_copy("tfrecord")
    relative = first_pair_shard(run)
    path = run / relative
    data = bytearray(path.read_bytes())
    second = 16 + struct.unpack_from("<Q", data, 0)[0]
    data[second + 12 + 3000] ^= 0x20  # inside an image of record 1
    path.write_bytes(bytes(data))
    crc = (relative, f"record 1 at byte {second}: bad data CRC")
    found = problems(validate_run(str(run)))
    assert found[0] == crc and found[1][1].startswith("sha256 mismatch") and len(found) == 2
    assert problems(validate_run(str(run), check_sha256=False)) == [crc]


def test_damaged_gzip_tfrecord_shard_is_caught(run_copy):
    run = run_copy("tfrecord-gzip")
    relative = first_pair_shard(run)
    path = run / relative
    original = path.read_bytes()
    data = gzip.decompress(original)
    second = 16 + struct.unpack_from("<Q", data, 0)[0]
    damaged = bytearray(data)
    damaged[second + 12 + 3000] ^= 0x20
    path.write_bytes(tfrecord.gzip_bytes(bytes(damaged)))
    found = problems(validate_run(str(run), check_sha256=False))
    assert (
        relative,
        f"record 1 at byte {second}: bad data CRC (offsets in the uncompressed stream)",
    ) in found
    path.write_bytes(original[:-100])  # truncated: a broken gzip stream
    found = problems(validate_run(str(run)))
    assert any(where == relative and "unreadable stream" in what for where, what in found)


def test_similarity_outside_the_band(run_copy):
    run = run_copy("parquet")
    high = manifest_of(run)["thresholds"]["high"]

    def same_image_twice(rows):
        rows[0]["target_embedding"] = rows[0]["cond_embedding"]
        cond = np.asarray(rows[0]["cond_embedding"], np.float64)
        rows[0]["similarity"] = float(np.float32(cond @ cond))

    relative = rewrite_pairs(run, same_image_twice)
    [(where, what)] = problems(validate_run(str(run)))
    assert where == relative
    assert what.startswith("row 0 (pair_id ") and what.endswith(
        f": similarity 1.000000 outside the band [{manifest_of(run)['thresholds']['low']}, {high}]"
    )


def test_non_unit_embedding(run_copy):
    run = run_copy("tfrecord")
    low, high = manifest_of(run)["thresholds"].values()

    def stretch(rows):
        for k, row in enumerate(rows):
            cond = np.asarray(row["cond_embedding"], np.float32) * np.float32(1.01)
            target = np.asarray(row["target_embedding"], np.float64)
            similarity = np.float32(cond.astype(np.float64) @ target)
            if low + 0.01 < similarity < high - 0.01:  # stays in band: only the norm is wrong
                row["cond_embedding"] = cond.tolist()
                row["similarity"] = float(similarity)
                stretch.row = k
                return
        raise AssertionError("no row to stretch")

    relative = rewrite_pairs(run, stretch)
    [(where, what)] = problems(validate_run(str(run)))
    assert where == relative
    assert what.startswith(f"row {stretch.row} (pair_id ")
    assert what.endswith(": cond_embedding has norm 1.010000, not 1")


def test_similarity_that_is_not_the_dot_product(run_copy):
    run = run_copy("parquet")

    def nudge(rows):
        rows[2]["similarity"] = float(np.float32(rows[2]["similarity"]) + np.float32(1e-4))

    rewrite_pairs(run, nudge)
    [(_, what)] = problems(validate_run(str(run)))
    assert what.startswith("row 2 (pair_id ") and "!= dot product of the embeddings" in what


def test_undecodable_image_whose_sha256_column_matches(run_copy):
    run = run_copy("parquet")
    junk = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8

    def break_image(rows):
        rows[1]["cond_image"] = junk
        rows[1]["cond_sha256"] = hashlib.sha256(junk).hexdigest()

    relative = rewrite_pairs(run, break_image)
    [(where, what)] = problems(validate_run(str(run), sample=10_000))
    assert where == relative
    assert what.startswith("row 1 (pair_id ") and ": cond_image does not decode (" in what


def test_wrong_schema_versions(run_copy):
    run = run_copy("parquet")
    manifest = manifest_of(run)
    shard = manifest["tables"]["images"]["shards"][0]
    path = run / shard["path"]
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({b"pairmill.schema": b"image_v0"}), path)
    data = path.read_bytes()
    manifest["tables"]["images"]["bytes"] += len(data) - shard["bytes"]
    shard.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert problems(validate_run(str(run))) == [
        (shard["path"], "schema image_v0, manifest.json says image_v1")
    ]

    run = run_copy("tfrecord")

    def drop_encoder(rows):
        for row in rows:
            row.pop("encoder")

    manifest = manifest_of(run)
    shard = manifest["tables"]["pairs"]["shards"][0]
    path = run / shard["path"]
    rows = list(tfrecord.read_rows(str(path)))
    drop_encoder(rows)
    lean = schemas.Schema(
        "lean", "pair", 1, "", tuple(f for f in schemas.load("pair").fields if f.name != "encoder")
    )
    data = tfrecord.TFRecordWriter().encode(rows, lean)
    path.write_bytes(data)
    manifest["tables"]["pairs"]["bytes"] += len(data) - shard["bytes"]
    shard.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (run / "manifest.json").write_text(json.dumps(manifest))
    [(where, what)] = problems(validate_run(str(run)))
    assert where == shard["path"]
    assert what == (
        "record 0 at byte 0: Example does not match pair_v1: missing feature(s) encoder"
        f" (and {shard['rows'] - 1} more rows)"
    )


def test_manifest_counts_and_unlisted_files(run_copy):
    run = run_copy("parquet")
    manifest = manifest_of(run)
    counts = manifest["counts"]
    counts["kept_pairs"] += 1
    counts["records_in"] += 2
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "pairs" / "stray.parquet").write_bytes(b"")
    kept = counts["kept_pairs"]
    assert problems(validate_run(str(run))) == [
        (
            "manifest",
            f"counts do not reconcile: records_in {counts['records_in']} != images "
            f"{counts['images']} + rejected {counts['rejected']}",
        ),
        ("manifest", f"pairs has {kept - 1} rows, counts.kept_pairs is {kept}"),
        ("pairs/stray.parquet", "not listed in manifest.json"),
        ("manifest", f"similarities mark {kept - 1} rows kept, counts.kept_pairs is {kept}"),
    ]


def test_cli_broken_run_prints_one_line_per_broken_shard_and_exits_1(run_copy, capsys):
    run = run_copy("tfrecord")
    shards = manifest_of(run)["tables"]["pairs"]["shards"]
    (run / shards[0]["path"]).unlink()
    path = run / shards[1]["path"]
    data = bytearray(path.read_bytes())
    data[20] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(run), "--sample", "2"])
    assert exc.value.code == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0] == f"BROKEN {shards[0]['path']}: missing (manifest.json lists it with " + (
        f"{shards[0]['rows']} rows)"
    )
    assert lines[1].startswith(f"BROKEN {shards[1]['path']}: record 0 at byte 0: bad data CRC; ")
    assert "sha256 mismatch" in lines[1]

    with pytest.raises(SystemExit) as exc:
        main(["validate", str(run), "--json"])
    assert exc.value.code == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and summary_lines(result) == lines


def test_missing_run_is_an_input_error(tmp_path, capsys):
    with pytest.raises(InputError, match="no such run directory"):
        validate_run(str(tmp_path / "nope"))
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(tmp_path)])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pairmill: error: {tmp_path} is not a pairmill run: no manifest.json"]
