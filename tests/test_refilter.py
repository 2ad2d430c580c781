"""`build --from-run`: re-filtering gives exactly what a fresh build with the new band gives."""

import json

import pyarrow.parquet as pq
import pytest

from pairmill.errors import ConfigError
from pipelines import build_pairs, refilter_pairs


def fresh(crawl, out, *extra):
    argv = [str(crawl), "--out", str(out), "--encoder", "tiny", "--device", "cpu", *extra]
    return build_pairs.run(argv).pairmill_manifest


def refilter(source, out, *extra):
    return refilter_pairs.run(["--from-run", str(source), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def wide_run(sample_crawl, tmp_path_factory):
    out = tmp_path_factory.mktemp("wide")
    fresh(sample_crawl, out, "--low", "-1", "--high", "1")
    return out


def shards(run, table):
    return json.loads((run / "manifest.json").read_text())["tables"][table]["shards"]


@pytest.mark.parametrize("sizing", [(), ("--shard-rows", "4")], ids=["one-shard", "shards"])
def test_refiltered_pairs_equal_a_fresh_build(wide_run, sample_crawl, tmp_path, sizing):
    manifest = refilter(
        wide_run, tmp_path / "re", "--low", "0.1", "--high", "0.6", *sizing
    ).pairmill_manifest
    fresh(sample_crawl, tmp_path / "fresh", "--low", "0.1", "--high", "0.6", *sizing)
    if sizing:  # several pair shards, each written from whole episodes
        assert len(shards(tmp_path / "re", "pairs")) > 1
    # Byte-identical shards: same pairs, same rows, same order, same similarities.
    for table in ("pairs", "images", "similarities", "rejects"):
        assert shards(tmp_path / "re", table) == shards(tmp_path / "fresh", table), table
    fresh_counts = json.loads((tmp_path / "fresh" / "manifest.json").read_text())["counts"]
    assert manifest["counts"] == fresh_counts
    assert manifest["from_run"]["run"] == str(wide_run)
    assert manifest["thresholds"] == {"low": 0.1, "high": 0.6}
    assert manifest["reconciled"]


def test_refilter_with_tighter_band_keeps_a_subset(wide_run, tmp_path):
    refilter(wide_run, tmp_path / "narrow", "--low", "0.3", "--high", "0.5")
    wide = {r["pair_id"] for r in pq.read_table(wide_run / "pairs").to_pylist()}
    narrow = pq.read_table(tmp_path / "narrow" / "pairs").to_pylist()
    assert narrow and {r["pair_id"] for r in narrow} < wide
    assert all(0.3 <= r["similarity"] <= 0.5 for r in narrow)


def test_refilter_needs_a_run(tmp_path):
    from pairmill.errors import InputError

    with pytest.raises(InputError, match="not a pairmill run"):
        refilter(tmp_path, tmp_path / "x")
    with pytest.raises(ConfigError, match="must differ"):
        refilter(tmp_path, tmp_path)
