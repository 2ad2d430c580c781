"""End-to-end builds on real photos, checking the output contract of DESIGN.md."""

import hashlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import build_pairs


def build(crawl, out, *extra):
    argv = [str(crawl), "--out", str(out), "--encoder", "tiny", "--device", "cpu", *extra]
    return build_pairs.run(argv).pairmill_manifest


@pytest.fixture(scope="module")
def run_dir(sample_crawl, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    build(sample_crawl, out)
    return out


def rows(run_dir, table):
    return pq.read_table(run_dir / table).to_pylist()


def test_counts_reconcile_and_every_record_is_accounted_for(run_dir, sample_crawl):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    counts = manifest["counts"]
    records_in = pq.read_metadata(sample_crawl).num_rows
    assert counts["records_in"] == records_in
    assert manifest["reconciled"]
    images, rejects = rows(run_dir, "images"), rows(run_dir, "rejects")
    assert counts["images"] == len(images) and counts["rejected"] == len(rejects)
    assert len(images) + len(rejects) == records_in
    seen = {(r["source"], r["row"]) for r in images} | {(r["source"], r["row"]) for r in rejects}
    assert len(seen) == records_in  # each input record in exactly one place
    reasons = {r["reason"] for r in rejects}
    assert {
        "duplicate",
        "decode_error",
        "too_small",
        "bad_aspect",
        "empty",
        "disallowed_url",
        "missing_field",
    } <= reasons
    assert all(r["detail"] for r in rejects)


def test_pairs_are_in_band_and_similarity_is_the_dot_product(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    low, high = manifest["thresholds"]["low"], manifest["thresholds"]["high"]
    pairs = rows(run_dir, "pairs")
    assert pairs, "the sample crawl should keep some pairs"
    for pair in pairs:
        cond = np.asarray(pair["cond_embedding"], dtype=np.float32)
        target = np.asarray(pair["target_embedding"], dtype=np.float32)
        assert abs(np.linalg.norm(cond) - 1) < 1e-5
        dot = np.float32(np.dot(cond.astype(np.float64), target.astype(np.float64)))
        assert np.float32(pair["similarity"]) == dot
        assert low <= pair["similarity"] <= high
        assert pair["cond_image_id"] < pair["target_image_id"]
        for side in ("cond", "target"):
            data = pair[f"{side}_image"]
            assert hashlib.sha256(data).hexdigest() == pair[f"{side}_sha256"]
            assert Image.open(io.BytesIO(data)).size == (
                pair[f"{side}_width"],
                pair[f"{side}_height"],
            )
    assert len({p["pair_id"] for p in pairs}) == len(pairs)


def test_similarities_cover_every_candidate_and_match_pairs(run_dir):
    images = rows(run_dir, "images")
    per_episode = {}
    for image in images:
        per_episode[image["episode_id"]] = per_episode.get(image["episode_id"], 0) + 1
    sims = rows(run_dir, "similarities")
    assert len(sims) == sum(n * (n - 1) // 2 for n in per_episode.values())
    kept = {s["pair_id"] for s in sims if s["kept"]}
    assert kept == {p["pair_id"] for p in rows(run_dir, "pairs")}


def test_tracking_variant_of_a_page_joins_its_episode(run_dir):
    images = rows(run_dir, "images")
    variant = next(i for i in images if i["url"].endswith("/0/extra.jpg"))
    assert variant["source_page_url"].startswith("HTTPS://")
    assert variant["page_url"] == "https://photos.example.org/gallery/0?lang=en"
    assert json.loads(variant["extra"]) == {"alt": "tracking variant of page 0"}


def test_manifest_lists_shards_with_true_hashes(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["encoder"]["weights"]["semantic"] is False
    for table, info in manifest["tables"].items():
        assert info["shards"], table
        for shard in info["shards"]:
            data = (run_dir / shard["path"]).read_bytes()
            assert len(data) == shard["bytes"]
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            assert pq.read_metadata(run_dir / shard["path"]).num_rows == shard["rows"]


def test_two_runs_are_identical_row_for_row(run_dir, sample_crawl, tmp_path):
    build(sample_crawl, tmp_path / "again")
    for table in ("pairs", "images", "similarities", "rejects"):
        first = json.loads((run_dir / "manifest.json").read_text())["tables"][table]["shards"]
        second = json.loads((tmp_path / "again" / "manifest.json").read_text())["tables"][table][
            "shards"
        ]
        assert first == second, table  # same files, same sha256


def test_pair_shards_hold_whole_episodes_built_from_the_images_table(sample_crawl, tmp_path):
    from pairmill.shards import shard_index

    manifest = build(sample_crawl, tmp_path, "--low", "-1", "--high", "1", "--shard-rows", "8")
    pair_shards = manifest["tables"]["pairs"]["shards"]
    total = -(-manifest["counts"]["kept_pairs"] // 8)  # the plan of --shard-rows 8
    assert len(pair_shards) > 1
    images = {r["image_id"]: r for r in rows(tmp_path, "images")}
    seen = 0
    for shard in pair_shards:
        index = int(shard["path"].split("-")[1])
        assert shard["path"] == f"pairs/pairs-{index:05d}-of-{total:05d}.parquet"
        pairs = pq.read_table(tmp_path / shard["path"]).to_pylist()
        assert [p["pair_id"] for p in pairs] == sorted(p["pair_id"] for p in pairs)
        for pair in pairs:
            assert shard_index(pair["episode_id"], total) == index  # by episode
            for side in ("cond", "target"):
                image = images[pair[f"{side}_image_id"]]
                assert pair[f"{side}_image"] == image["image"]
                assert pair[f"{side}_sha256"] == image["sha256"]
                assert pair["episode_id"] == image["episode_id"]
        seen += len(pairs)
    assert seen == manifest["counts"]["kept_pairs"] == manifest["tables"]["pairs"]["rows"]


def test_refuses_to_overwrite_without_flag(run_dir, sample_crawl):
    from pairmill.errors import ConfigError

    with pytest.raises(ConfigError, match="--overwrite"):
        build(sample_crawl, run_dir)


def test_resize_and_reencode_and_pair_cap(sample_crawl, tmp_path):
    manifest = build(
        sample_crawl,
        tmp_path,
        "--resize",
        "center_crop",
        "--image-size",
        "64",
        "--image-format",
        "webp",
        "--max-pairs-per-episode",
        "1",
        "--low",
        "-1",
        "--high",
        "1",
        "--shard-rows",
        "10",
    )
    images = rows(tmp_path, "images")
    assert {(i["width"], i["height"], i["format"]) for i in images} == {(64, 64, "webp")}
    assert manifest["counts"]["kept_pairs"] == manifest["counts"]["episodes"]
    assert len(manifest["tables"]["images"]["shards"]) >= 3


def test_a_page_with_more_images_than_the_cap(tmp_path, photos):
    from pairmill.sample import jpeg_bytes, variant

    rng = np.random.default_rng(1)
    data = [jpeg_bytes(variant(photos[i % 5][1], rng, 70, 90)) for i in range(30)]
    rows_in = [
        {"page_url": "https://hot.example/", "image_url": f"https://i/{i}.jpg", "image": data[i]}
        for i in range(30)
    ]
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows_in), tmp_path / "hot.parquet")
    manifest = build(tmp_path / "hot.parquet", tmp_path / "run", "--max-images-per-episode", "8")
    assert manifest["counts"]["images"] == 8
    assert manifest["counts"]["rejects"] == {"capped": 22}
    assert manifest["counts"]["candidate_pairs"] == 28


@pytest.mark.parametrize("pages, boilerplate", [(10, False), (11, True)])
def test_an_image_on_too_many_pages_is_boilerplate_everywhere(
    tmp_path, jpeg_of, pages, boilerplate
):
    import pyarrow as pa

    logo = jpeg_of("coins", (100, 80))
    rows_in = []
    for page in range(pages):
        rows_in.append(
            {
                "page_url": f"https://s.example/{page}",
                "image_url": f"https://c/{page}/logo",
                "image": logo,
            }
        )
        rows_in.append(
            {
                "page_url": f"https://s.example/{page}",
                "image_url": f"https://c/{page}.jpg",
                "image": jpeg_of("astronaut", (100 + page, 100)),
            }
        )
    pq.write_table(pa.Table.from_pylist(rows_in), tmp_path / "c.parquet")
    manifest = build(tmp_path / "c.parquet", tmp_path / "run")
    assert manifest["counts"]["rejects"].get("boilerplate", 0) == (pages if boilerplate else 0)
    assert manifest["counts"]["images"] == (pages if boilerplate else 2 * pages)
    assert manifest["reconciled"]
