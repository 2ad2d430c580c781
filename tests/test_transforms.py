"""One FnApiRunner pipeline test per transform."""

import json
import math

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to

from pairmill import rows as rows_mod
from pairmill import transforms as t
from pairmill.images import DecodeConfig
from pairmill.pairing import Candidate
from pairmill.records import CrawlRecord
from pairmill.selection import assign_episode


def pipeline():
    return beam.Pipeline(runner="FnApiRunner")


def rec(row, page="https://a.example/p", url=None, data=b"", path=None):
    r = CrawlRecord("crawl.parquet", row, page, url or f"https://cdn/{row}.jpg", data, path)
    return assign_episode(r)


def test_read_crawl(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"page_url": "https://p", "image_url": "https://i", "image_path": "x"}\n{bad\n'
    )
    with pipeline() as p:
        out = p | t.ReadCrawl([str(path)])
        assert_that(out.records | beam.Map(lambda r: r.row), equal_to([0]), label="records")
        assert_that(
            out[t.REJECTS] | beam.Map(lambda r: r["reason"]),
            equal_to(["malformed_record"]),
            label="rejects",
        )


def test_group_into_episodes_caps_and_dedups():
    records = [rec(i, data=b"x") for i in range(20)]
    first = min(records, key=lambda r: r.image_id)  # certainly within the cap
    records += [rec(100 + i, url=first.image_url, data=b"x") for i in range(3)]
    records.append(CrawlRecord("crawl.parquet", 999, None, "https://cdn/z.jpg", b"x"))
    with pipeline() as p:
        out = p | beam.Create(records) | t.GroupIntoEpisodes(cap=5)
        assert_that(
            out["records"] | beam.Map(lambda r: r.row),
            equal_to([r.row for r in sorted(records[:20], key=lambda r: r.image_id)[:5]]),
            label="kept",
        )
        reasons = out[t.REJECTS] | beam.Map(lambda r: r["reason"])
        assert_that(
            reasons | beam.combiners.Count.PerElement(),
            equal_to([("capped", 15), ("duplicate", 3), ("missing_field", 1)]),
            label="rejects",
        )


def test_load_image_bytes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    records = [rec(0, data=None, path=str(tmp_path / "a.bin")), rec(1, data=None, path="/nope")]
    with pipeline() as p:
        out = p | beam.Create(records) | t.LoadImageBytes(max_bytes=100)
        assert_that(out.records | beam.Map(lambda r: r.image), equal_to([b"abc"]), label="ok")
        assert_that(
            out[t.REJECTS] | beam.Map(lambda r: r["reason"]), equal_to(["fetch_error"]), label="rej"
        )


def _loaded(row, page, url, data):
    from pairmill.selection import load_bytes

    return load_bytes(rec(row, page=page, url=url, data=data), 10**8)


def test_decode_images_decodes_each_content_once(jpeg_of):
    cat, coffee = jpeg_of("chelsea", (200, 150)), jpeg_of("coffee", (200, 150))
    records = [
        _loaded(0, "https://a/p", "https://i/cat.jpg", cat),
        _loaded(1, "https://a/p", "https://i/cat-copy.jpg", cat),  # same content, same page
        _loaded(2, "https://b/q", "https://i/cat.jpg", cat),  # same content, other page
        _loaded(3, "https://a/p", "https://i/coffee.jpg", coffee),
        _loaded(4, "https://a/p", "https://i/bad.jpg", b"<html>"),
    ]
    with pipeline() as p:
        out = p | beam.Create(records) | t.DecodeImages(DecodeConfig(), "tiny")
        summary = out.decoded | beam.Map(lambda kv: (len(kv[0].members), kv[1].shape))
        assert_that(summary, equal_to([(2, (64, 64, 3)), (1, (64, 64, 3))]), label="decoded")
        assert_that(
            out[t.REJECTS] | beam.Map(lambda r: r["reason"]),
            equal_to(["duplicate", "decode_error"]),
            label="rejects",
        )


@pytest.fixture(scope="module")
def tiny_handler():
    from pairmill.embedding import EncoderModelHandler
    from pairmill.encoders import get_preset, resolve_weights

    return EncoderModelHandler("tiny", resolve_weights(get_preset("tiny"), None), "cpu", 4)


def test_embed_images(jpeg_of, tiny_handler):
    records = [
        _loaded(i, "https://a/p", f"https://i/{i}.jpg", jpeg_of(n, (120, 100)))
        for i, n in enumerate(["chelsea", "coffee", "rocket"])
    ]
    with pipeline() as p:
        decoded = p | beam.Create(records) | t.DecodeImages(DecodeConfig(), "tiny")
        out = decoded.decoded | t.EmbedImages(tiny_handler, "tiny")
        norms = out.light | beam.Map(lambda kv: round(float(np.linalg.norm(kv[1][1])), 5))
        assert_that(norms, equal_to([1.0, 1.0, 1.0]), label="unit")
        widths = out.images | beam.Map(lambda kv: (kv[1]["width"], len(kv[1]["embedding"])))
        assert_that(widths, equal_to([(120, 128)] * 3), label="rows")


def test_pair_within_episodes():
    def unit(*v):
        v = np.asarray(v, dtype=np.float32)
        return v / np.linalg.norm(v)

    light = [
        ("e1", ("a", unit(1, 0))),
        ("e1", ("b", unit(1, 1))),
        ("e1", ("c", unit(0, 1))),
        ("e2", ("d", unit(1, 0))),
    ]
    with pipeline() as p:
        out = p | beam.Create(light) | t.PairWithinEpisodes(0.5, 0.9, None)
        assert_that(
            out.similarities | beam.Map(lambda r: r["kept"]),
            equal_to([True, False, True]),
            label="sims",
        )
        assert_that(
            out.pairs | beam.Map(lambda kv: (kv[1].cond_image_id, kv[1].target_image_id)),
            equal_to([("a", "b"), ("b", "c")]),
            label="pairs",
        )
        assert_that(
            out.stats,
            equal_to(
                [
                    ("episodes", 1),
                    ("episodes", 1),
                    ("paired_images", 3),
                    ("images_in_kept_pairs", 3),
                ]
            ),
            label="stats",
        )


def _image_row(episode, image_id, tokens=False):
    """An image row (``image_v1``, or ``image_v2`` with tokens) with its own bytes."""
    seed = sum(map(ord, episode + image_id))
    row = {
        "image_id": image_id,
        "episode_id": episode,
        "page_url": f"https://{episode}.example/",
        "source_page_url": f"https://{episode}.example/?utm_source=x",
        "url": f"https://cdn/{episode}/{image_id}.jpg",
        "sha256": f"{seed:064x}",
        "format": "jpeg",
        "width": 10 + seed % 7,
        "height": 20 + seed % 5,
        "source_width": 30,
        "source_height": 40,
        "image": bytes([seed % 251]) * (50 + seed % 13),
        "embedding": [float(np.float32(seed % 10 / 10)), 0.5, -0.25],
        "extra": "{}",
        "source": "crawl.parquet",
        "row": seed,
    }
    if tokens:
        row.update(rows_mod.token_fields(np.full((4, 2), seed % 9, dtype=np.float16)))
    return row


def _episode(episode, n, tokens=False):
    """n image rows of one episode and its candidates (every other one kept)."""
    from pairmill.pairing import pair_id

    images = [_image_row(episode, f"i{k}", tokens) for k in range(n)]
    candidates = [
        Candidate(
            pair_id(episode, a["image_id"], b["image_id"]),
            episode,
            a["image_id"],
            b["image_id"],
            0.125 * (j % 8),
            j % 2 == 0,
        )
        for j, (a, b) in enumerate((a, b) for i, a in enumerate(images) for b in images[i + 1 :])
    ]
    return images, candidates


def test_pair_sizes_add_up_to_the_pair_rows_size():
    from pairmill import shards

    for tokens in (False, True):
        images, candidates = _episode("e", 3, tokens)
        by_id = {row["image_id"]: row for row in images}
        sizes = [(row["image_id"], shards.pair_side_sizes(row)) for row in images]
        kept = [c for c in candidates if c.kept]
        expected = [
            shards.row_size(
                rows_mod.pair_row(c, by_id[c.cond_image_id], by_id[c.target_image_id], "tiny")
            )
            for c in kept
        ]
        assert shards.episode_pair_plan(sizes, kept, "tiny") == (len(kept), sum(expected))
        assert shards.episode_pair_plan(sizes, [], "tiny") == (0, 0)


def test_episode_pair_group_sends_each_used_image_once():
    from pairmill import shards

    images, candidates = _episode("e", 4)
    kept = [c for c in candidates if c.kept]
    group_images, group_pairs = shards.episode_pair_group(images, kept)
    used = {c.cond_image_id for c in kept} | {c.target_image_id for c in kept}
    assert sorted(r["image_id"] for r in group_images) == sorted(used)
    assert group_pairs == kept
    assert shards.episode_pair_group(images, []) is None
    by_id = {row["image_id"]: row for row in images}
    assert shards.episode_pair_rows(group_images, kept, "tiny") == [
        rows_mod.pair_row(c, by_id[c.cond_image_id], by_id[c.target_image_id], "tiny") for c in kept
    ]


def _read_pair_shard(path, schema_id):
    import schemas
    from pairmill import tfrecord

    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return list(tfrecord.read_rows(str(path), schemas.load(schema_id)))


@pytest.mark.parametrize(
    "tokens, fmt, options",
    [
        (False, "parquet", {}),
        (True, "parquet", {}),
        (True, "tfrecord", {"compression": "gzip"}),
        (False, "tfrecord", {}),
    ],
)
def test_write_pair_shards_builds_each_episodes_rows_in_its_shard(tmp_path, tokens, fmt, options):
    from pairmill.shards import shard_index

    schema_id = "pair_v2" if tokens else "pair_v1"
    episodes = {f"e{k}": _episode(f"e{k}", n, tokens) for k, n in enumerate((4, 3, 5, 2, 1))}
    images = [row for rows_, _ in episodes.values() for row in rows_]
    images.append(_image_row("lonely", "i0", tokens))  # an episode without candidates
    kept = [(e, c) for e, (_, cands) in episodes.items() for c in cands if c.kept]
    out = str(tmp_path)
    with pipeline() as p:
        infos = (
            p | "I" >> beam.Create(images),
            p | "K" >> beam.Create(kept),
        ) | t.WritePairShards(out, schema_id, fmt, "tiny", 3, 256.0, options)
        _ = (infos, p | "C" >> beam.Create([])) | t.WriteReport(f"{out}/_report.json")
    shards = json.loads((tmp_path / "_report.json").read_text())["shards"]
    total = math.ceil(len(kept) / 3)  # the plan of --shard-rows 3
    extension = {"parquet": ".parquet", "tfrecord": ".tfrecord"}[fmt]
    extension += ".gz" if options else ""
    # Whole episodes, by a hash of their id: the shards some episode with pairs went to.
    used = sorted({shard_index(e, total) for e, _ in kept})
    assert total > 1 and len(used) > 1
    assert [s["path"] for s in shards] == [
        f"pairs/pairs-{i:05d}-of-{total:05d}{extension}" for i in used
    ]
    by_id = {(row["episode_id"], row["image_id"]): row for row in images}
    for index, info in zip(used, shards, strict=True):
        got = _read_pair_shard(tmp_path / info["path"], schema_id)
        mine = [(e, c) for e, c in kept if shard_index(e, total) == index]
        want = sorted(
            (
                rows_mod.pair_row(
                    c, by_id[(e, c.cond_image_id)], by_id[(e, c.target_image_id)], "tiny"
                )
                for e, c in mine
            ),
            key=lambda row: row["pair_id"],
        )
        assert info["rows"] == len(want) and info["schema"] == schema_id
        assert [r["pair_id"] for r in got] == [r["pair_id"] for r in want]
        for row, expected in zip(got, want, strict=True):
            for name, value in expected.items():
                if name.endswith("embedding") or name == "similarity":
                    assert np.allclose(row[name], value), name
                else:
                    assert row[name] == value, name
            if tokens:
                assert (
                    row["cond_tokens"] == by_id[(row["episode_id"], row["cond_image_id"])]["tokens"]
                )


def test_write_pair_shards_without_pairs_writes_nothing(tmp_path):
    with pipeline() as p:
        infos = (
            p | "I" >> beam.Create([_image_row("e", "a")]),
            p | "K" >> beam.Create([]),
        ) | t.WritePairShards(str(tmp_path), "pair_v1", "parquet", "tiny", None, 256.0)
        assert_that(infos, equal_to([]))  # the driver writes the empty table's one shard
    assert not (tmp_path / "pairs").exists()


def test_write_shards_and_report(tmp_path):
    rows = [
        {
            "pair_id": f"p{i:03d}",
            "episode_id": "e",
            "cond_image_id": "a",
            "target_image_id": "b",
            "similarity": 0.5,
            "kept": bool(i % 2),
        }
        for i in range(25)
    ]
    out = str(tmp_path)
    with pipeline() as p:
        shards = (
            p
            | beam.Create(rows)
            | t.WriteShards(out, "similarities", "similarity_v1", "parquet", "pair_id", 10, 256.0)
        )
        counts = p | "C" >> beam.Create([("kept_pairs", 12), ("kept_pairs", 1)])
        _ = (shards, counts) | t.WriteReport(f"{out}/_report.json")
    report = json.loads((tmp_path / "_report.json").read_text())
    assert report["counts"] == {"kept_pairs": 13}
    assert [s["path"] for s in report["shards"]] == [
        f"similarities/similarities-0000{i}-of-00003.parquet" for i in range(3)
    ]
    assert sum(s["rows"] for s in report["shards"]) == 25
    table = pq.read_table(tmp_path / "similarities")
    assert sorted(table.column("pair_id").to_pylist()) == [r["pair_id"] for r in rows]
    first = pq.read_table(tmp_path / report["shards"][0]["path"]).column("pair_id").to_pylist()
    assert first == sorted(first)
    assert isinstance(table.schema.field("similarity").type, pa.DataType)


def test_read_run_table(tmp_path):
    import schemas

    rows = [
        {
            "pair_id": f"p{i}",
            "episode_id": "e",
            "cond_image_id": "a",
            "target_image_id": "b",
            "similarity": 0.1 * i,
            "kept": True,
        }
        for i in range(7)
    ]
    path = tmp_path / "s.parquet"
    pq.write_table(
        pa.Table.from_pylist(rows, schema=schemas.load("similarity").arrow()),
        path,
        row_group_size=3,
    )
    with pipeline() as p:
        out = p | t.ReadRunTable([str(path)])
        assert_that(out | beam.Map(lambda r: r["pair_id"]), equal_to([r["pair_id"] for r in rows]))


def test_write_run_counts_tables(tmp_path):
    reject = {
        "image_url": "u",
        "page_url": "p",
        "episode_id": None,
        "reason": "empty",
        "detail": "zero bytes",
        "source": "f",
        "row": 0,
    }
    with pipeline() as p:
        tables = {
            "kept_pairs": p | "P" >> beam.Create([]),
            "images": p | "I" >> beam.Create([]),
            "similarities": p | "S" >> beam.Create([]),
            "rejects": p | "R" >> beam.Create([reject]),
            "counts": p | "C" >> beam.Create([("records_in", 1)]),
        }
        _ = tables | t.WriteRun(str(tmp_path), "parquet", {}, None, 256.0, encoder="tiny")
    report = json.loads((tmp_path / "_report.json").read_text())
    assert report["counts"] == {"records_in": 1, "rejects.empty": 1}
    assert [s["table"] for s in report["shards"]] == ["rejects"]


def test_drop_boilerplate():
    logo, photo = b"logo-bytes", b"photo-bytes"
    records = [_loaded(i, f"https://site/{i}", f"https://cdn/logo-{i}.png", logo) for i in range(4)]
    records += [
        _loaded(10 + i, f"https://site/{i}", f"https://cdn/p{i}.jpg", photo + bytes([i]))
        for i in range(4)
    ]
    records.append(_loaded(20, "https://site/0", "https://cdn/shared.jpg", photo))
    records.append(_loaded(21, "https://site/1", "https://cdn/shared.jpg", photo))
    with pipeline() as p:
        out = p | beam.Create(records) | t.DropBoilerplate(max_pages=3)
        assert_that(
            out.records | beam.Map(lambda r: r.row),
            equal_to([10, 11, 12, 13, 20, 21]),
            label="kept",
        )
        assert_that(
            out[t.REJECTS] | beam.Map(lambda r: (r["reason"], r["row"])),
            equal_to([("boilerplate", i) for i in range(4)]),
            label="rejects",
        )
