"""Reading pair shards back: read_pairs and the PairShards torch dataset, on real builds."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

import schemas
from pairmill.data import PairShards, list_shards, list_units, read_pairs
from pairmill.errors import InputError, MissingDependencyError
from pipelines import build_pairs

# 3 DataLoader workers on a 2-core machine are intended: they test the split, not speed.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

ROW_GROUP_ROWS = 7  # small, so that every shard has several row groups


def build(crawl, out, *extra):
    argv = [str(crawl), "--out", str(out), "--encoder", "tiny", "--device", "cpu"]
    build_pairs.run([*argv, "--low", "-1", "--high", "1", "--shard-rows", "25", *extra])
    return out


@pytest.fixture(scope="module")
def run_dir(sample_crawl, tmp_path_factory):
    return build(sample_crawl, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def expected(run_dir):
    """Every pair row as pyarrow reads it, by pair_id."""
    rows = pq.read_table(run_dir / "pairs").to_pylist()
    return {row["pair_id"]: row for row in rows}


@pytest.fixture(scope="module")
def grouped(run_dir, tmp_path_factory):
    """The run's pair shards rewritten with small row groups (many work units per shard)."""
    out = tmp_path_factory.mktemp("grouped")
    for shard in sorted((run_dir / "pairs").glob("*.parquet")):
        pq.write_table(pq.read_table(shard), out / shard.name, row_group_size=ROW_GROUP_ROWS)
    return out


@pytest.fixture(scope="module")
def tfrecord_run(sample_crawl, tmp_path_factory):
    pytest.importorskip("pairmill.tfrecord")
    out = tmp_path_factory.mktemp("tfrun")
    return build(sample_crawl, out, "--format", "tfrecord", "--compression", "gzip")


def ids(rows) -> list[str]:
    return [row["pair_id"] for row in rows]


def assert_same_rows(rows, expected):
    """Every expected row exactly once, every column equal (bytes and float32 bit-exact)."""
    assert Counter(ids(rows)) == Counter({pair_id: 1 for pair_id in expected})
    for row in rows:
        want = expected[row["pair_id"]]
        assert set(row) == set(want)
        for name, value in row.items():
            if name.endswith("_embedding"):
                assert value.dtype == np.float32
                assert value.tobytes() == np.asarray(want[name], np.float32).tobytes()
            else:
                assert type(value) is type(want[name]) and value == want[name], name


def loader_ids(dataset, num_workers: int) -> list[str]:
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return [row["pair_id"] for row in loader]


# -- read_pairs -------------------------------------------------------------------------------


def test_read_pairs_gives_every_row_bit_exact(run_dir, expected):
    assert len(expected) > 40 and len(list_shards(run_dir)) > 1
    assert_same_rows(list(read_pairs(run_dir)), expected)


def test_row_groups_are_the_work_units(grouped, expected):
    units = list_units(grouped)
    groups = sum(pq.ParquetFile(p).num_row_groups for p in grouped.glob("*.parquet"))
    assert len(units) == groups > len(list(grouped.glob("*.parquet")))
    assert_same_rows(list(read_pairs(grouped)), expected)


def test_columns_are_projected(run_dir, expected):
    rows = list(read_pairs(run_dir, columns=["pair_id", "similarity"]))
    assert all(set(row) == {"pair_id", "similarity"} for row in rows)
    assert {r["pair_id"]: r["similarity"] for r in rows} == {
        k: v["similarity"] for k, v in expected.items()
    }
    with pytest.raises(InputError, match="no column 'nope'"):
        next(read_pairs(run_dir, columns=["nope"]))


def test_urls_resolve_run_dirs_pairs_dirs_globs_and_fsspec(run_dir, expected):
    files = sorted(str(p) for p in (run_dir / "pairs").glob("*.parquet"))
    for urls in (
        run_dir,
        str(run_dir / "pairs"),
        str(run_dir / "pairs" / "*.parquet"),
        files,
        [f"file://{f}" for f in files],
    ):
        assert [url.removeprefix("file://") for url, _ in list_shards(urls)] == files
    assert Counter(ids(read_pairs(files[:1]))) == Counter(ids(pq.read_table(files[0]).to_pylist()))
    # A URL of a non-local filesystem goes through fsspec.
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/pairmill-test/pairs-0.parquet", Path(files[0]).read_bytes())
    rows = list(read_pairs("memory://pairmill-test/*.parquet"))
    assert len(rows) == pq.read_metadata(files[0]).num_rows


def test_missing_inputs_and_filesystems_fail_clearly(tmp_path):
    with pytest.raises(InputError, match="no pair shards"):
        list_shards(str(tmp_path / "nothing"))
    with pytest.raises(InputError, match="no pair shards"):
        list_shards(str(tmp_path / "*.parquet"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="not a pair shard"):
        list_shards(str(tmp_path / "notes.txt"))
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="pip install gcsfs"):
            list_shards("gs://some-bucket/run/pairs/*.parquet")


def test_read_pairs_decodes_to_numpy(run_dir, expected):
    row = next(read_pairs(run_dir, decode=True))
    want = expected[row["pair_id"]]
    assert row["cond_image"].dtype == np.uint8
    assert row["cond_image"].shape == (want["cond_height"], want["cond_width"], 3)
    row = next(read_pairs(run_dir, decode=True, image_size=24))
    assert row["target_image"].shape == (24, 24, 3)


# -- PairShards: exactly once -----------------------------------------------------------------


def test_undecoded_rows_are_the_rows_read_pairs_gives(grouped, expected):
    assert_same_rows(list(PairShards(grouped, decode=False)), expected)


@pytest.mark.parametrize("num_workers", [0, 1, 3])
def test_each_row_once_with_dataloader_workers(grouped, expected, num_workers):
    dataset = PairShards(grouped, decode=False)
    assert Counter(loader_ids(dataset, num_workers)) == Counter(expected.keys())


@pytest.mark.parametrize("num_workers", [0, 3])
def test_two_ranks_partition_the_rows(grouped, expected, num_workers):
    per_rank = [
        set(loader_ids(PairShards(grouped, decode=False, rank=r, world_size=2), num_workers))
        for r in range(2)
    ]
    assert per_rank[0] and per_rank[1]
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == set(expected)
    assert sum(map(len, per_rank)) == len(expected)


def _read_as_distributed_rank(rank: int, world_size: int, shards: str, tmp: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    try:
        dataset = PairShards(shards, decode=False)
        assert (dataset.rank, dataset.world_size) == (rank, world_size)
        Path(tmp, f"rank{rank}.txt").write_text("\n".join(ids(dataset)))
    finally:
        dist.destroy_process_group()


def test_ranks_come_from_torch_distributed(grouped, expected, tmp_path):
    import torch.multiprocessing as mp

    args = (2, str(grouped), str(tmp_path))
    mp.start_processes(_read_as_distributed_rank, args, nprocs=2, start_method="fork")
    per_rank = [set((tmp_path / f"rank{r}.txt").read_text().split()) for r in range(2)]
    assert per_rank[0] and not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == set(expected)


def test_more_readers_than_units_leaves_some_empty_without_duplicates(run_dir, expected):
    units = len(list_units(run_dir))
    world = units + 2
    per_rank = [
        ids(PairShards(run_dir, decode=False, rank=r, world_size=world)) for r in range(world)
    ]
    assert sum(1 for rows in per_rank if not rows) == 2
    assert Counter(i for rows in per_rank for i in rows) == Counter(expected.keys())


def test_bad_rank_is_refused(run_dir):
    with pytest.raises(ValueError, match="rank"):
        PairShards(run_dir, rank=2, world_size=2)


# -- PairShards: shuffling --------------------------------------------------------------------


def test_shuffle_buffer_is_seeded_and_changes_with_the_epoch(grouped, expected):
    plain = ids(PairShards(grouped, decode=False))
    dataset = PairShards(grouped, decode=False, shuffle_buffer=16, seed=3)
    first = ids(dataset)
    assert Counter(first) == Counter(plain) and first != plain
    assert ids(PairShards(grouped, decode=False, shuffle_buffer=16, seed=3)) == first
    assert ids(PairShards(grouped, decode=False, shuffle_buffer=16, seed=4)) != first
    dataset.set_epoch(1)
    second = ids(dataset)
    assert Counter(second) == Counter(plain) and second != first
    dataset.set_epoch(0)
    assert ids(dataset) == first


def test_shuffled_ranks_and_workers_still_read_each_row_once(grouped, expected):
    seen = []
    for rank in range(2):
        dataset = PairShards(grouped, decode=False, shuffle_buffer=8, rank=rank, world_size=2)
        dataset.set_epoch(5)
        seen += loader_ids(dataset, num_workers=3)
    assert Counter(seen) == Counter(expected.keys())


# -- PairShards: decoding and collation -------------------------------------------------------


def test_decoded_rows_are_uint8_chw_tensors(run_dir, expected):
    for row in PairShards(run_dir, image_size=32):
        for side in ("cond", "target"):
            image = row[f"{side}_image"]
            assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
            assert row[f"{side}_embedding"].dtype == torch.float32
        want = expected[row["pair_id"]]
        assert row["cond_embedding"].numpy().tobytes() == (
            np.asarray(want["cond_embedding"], np.float32).tobytes()
        )
        assert row["similarity"] == want["similarity"] and row["page_url"] == want["page_url"]
    full = next(iter(PairShards(run_dir)))
    want = expected[full["pair_id"]]
    assert full["cond_image"].shape == (3, want["cond_height"], want["cond_width"])


def test_exif_orientation_is_applied(tmp_path, photos):
    """A JPEG stored landscape with EXIF orientation 6 (rotate 90) decodes as portrait."""
    stored = Image.fromarray(dict(photos)["astronaut"]).resize((96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    data = buffer.getvalue()
    shard = tmp_path / "pairs-00000-of-00001.parquet"
    pq.write_table(
        pa.Table.from_pylist([pair_row(data)], schema=schemas.load("pair").arrow()), shard
    )

    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert upright.shape == (96, 64, 3)
    row = next(iter(PairShards(shard)))
    assert row["cond_image"].shape == (3, 96, 64)
    assert np.array_equal(row["cond_image"].permute(1, 2, 0).numpy(), upright)
    square = next(iter(PairShards(shard, image_size=32)))["cond_image"]
    assert square.shape == (3, 32, 32)


def pair_row(image: bytes) -> dict:
    side = {"url": "https://cdn.example.org/a.jpg", "sha256": "0" * 64, "width": 64}
    row = {"pair_id": "p0", "episode_id": "e0", "page_url": "https://example.org/"}
    for name in ("cond", "target"):
        row |= {f"{name}_{key}": value for key, value in side.items()}
        row |= {f"{name}_image_id": name, f"{name}_height": 96, f"{name}_image": image}
        row[f"{name}_embedding"] = [1.0, 0.0]
    return row | {"similarity": 1.0, "encoder": "tiny"}


def test_default_collate_stacks_batches(run_dir):
    loader = DataLoader(PairShards(run_dir, image_size=32), batch_size=4)
    batch = next(iter(loader))
    assert batch["cond_image"].shape == (4, 3, 32, 32) and batch["cond_image"].dtype == torch.uint8
    assert batch["target_embedding"].dtype == torch.float32
    assert batch["target_embedding"].shape[0] == 4
    assert isinstance(batch["pair_id"], list) and len(batch["pair_id"]) == 4
    assert batch["cond_width"].shape == (4,) and batch["similarity"].shape == (4,)
    raw = next(iter(DataLoader(PairShards(run_dir, decode=False), batch_size=4)))
    assert isinstance(raw["cond_image"], list) and isinstance(raw["cond_image"][0], bytes)
    assert raw["cond_embedding"].dtype == torch.float32 and raw["cond_embedding"].shape[0] == 4


# -- TFRecord ---------------------------------------------------------------------------------


def test_tfrecord_run_reads_the_same_rows(tfrecord_run, expected):
    shards = list_shards(tfrecord_run)
    assert len(shards) > 1
    assert all(url.endswith(".tfrecord.gz") and fmt == "tfrecord" for url, fmt in shards)
    assert_same_rows(list(read_pairs(tfrecord_run)), expected)
    assert_same_rows(list(read_pairs(str(tfrecord_run / "pairs" / "*.tfrecord.gz"))), expected)


@pytest.mark.parametrize("num_workers", [0, 3])
def test_tfrecord_each_row_once_across_ranks_and_workers(tfrecord_run, expected, num_workers):
    seen = []
    for rank in range(2):
        dataset = PairShards(tfrecord_run, decode=False, rank=rank, world_size=2)
        seen += loader_ids(dataset, num_workers)
    assert Counter(seen) == Counter(expected.keys())


def test_tfrecord_decodes_and_projects(tfrecord_run):
    row = next(iter(PairShards(tfrecord_run, image_size=16, columns=["pair_id", "cond_image"])))
    assert set(row) == {"pair_id", "cond_image"} and row["cond_image"].shape == (3, 16, 16)
