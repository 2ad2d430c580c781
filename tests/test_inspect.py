"""`pairmill inspect` and `hist --examples` on a real tiny run: summary, sheets, pixels."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pairmill import contact, hist, inspect_run
from pairmill.cli import main

# Pages 0-2 of the sample crawl move to another domain (with www., which domains drop).
OTHER = "https://www.pics.example.com/album/"


@pytest.fixture(scope="module")
def run_dir(sample_crawl, tmp_path_factory):
    from pipelines import build_pairs

    crawl_dir = tmp_path_factory.mktemp("crawl2")
    shutil.copytree(sample_crawl.parent / "files", crawl_dir / "files")
    table = pq.read_table(sample_crawl)
    urls = [
        OTHER + u.split("/gallery/")[1] if u and u.split("/gallery/")[-1][:1] in "012" else u
        for u in table.column("page_url").to_pylist()
    ]
    table = table.set_column(table.schema.get_field_index("page_url"), "page_url", [urls])
    pq.write_table(table, crawl_dir / "crawl.parquet", row_group_size=16)
    out = tmp_path_factory.mktemp("run") / "run"
    args = [str(crawl_dir / "crawl.parquet"), "--out", str(out), "--encoder", "tiny"]
    build_pairs.run([*args, "--device", "cpu"])
    return str(out)


def _manifest(run_dir):
    return json.loads(open(f"{run_dir}/manifest.json").read())


def _dark(image: np.ndarray, box) -> int:
    x0, y0, x1, y1 = box
    return int((image[y0:y1, x0:x1].max(axis=-1) < 100).sum())


def _std(image: np.ndarray, box) -> float:
    x0, y0, x1, y1 = box
    return float(image[y0:y1, x0:x1].std())


def test_json_summary_equals_the_manifest(run_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["inspect", run_dir, "--json"])
    assert exc.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    manifest = _manifest(run_dir)
    assert summary["counts"] == manifest["counts"]
    assert summary["thresholds"] == manifest["thresholds"]
    assert summary["encoder"] == {"name": "tiny", "weights": "random (seed 0)", "semantic": False}
    for name, table in manifest["tables"].items():
        assert summary["tables"][name]["rows"] == table["rows"]
        assert summary["tables"][name]["bytes"] == table["bytes"]
        assert summary["tables"][name]["shards"] == len(table["shards"])
    domains = {d["domain"]: d["kept"] for d in summary["top_domains"]}
    assert set(domains) == {"photos.example.org", "pics.example.com"}
    assert sum(domains.values()) == manifest["counts"]["kept_pairs"]


def test_text_summary(run_dir, capsys):
    with pytest.raises(SystemExit):
        main(["inspect", run_dir])
    out = capsys.readouterr().out
    counts = _manifest(run_dir)["counts"]
    assert f"kept pairs{counts['kept_pairs']:>26,}" in out
    assert "not semantic" in out and "pics.example.com" in out and "rejected duplicate" in out


def test_sheet_grid_cells_and_captions(run_dir, tmp_path, capsys):
    path = tmp_path / "sheet.png"
    with pytest.raises(SystemExit) as exc:
        main(["inspect", run_dir, "--png", str(path), "--n", "6"])
    assert exc.value.code == 0 and "6 pairs" in capsys.readouterr().out
    image = np.asarray(Image.open(path).convert("RGB"))
    layout = contact.Layout(rows=2, columns=4, title_height=contact.LINE_HEIGHT + 6)
    assert image.shape[:2] == (layout.size[1], layout.size[0])
    for i in range(8):
        r, c = divmod(i, 4)
        boxes = [layout.image_box(r, c, side) for side in (0, 1)]
        if i < 6:
            assert all(_std(image, box) > 10 for box in boxes), i  # real photos, not blank
            assert _dark(image, layout.caption_box(r, c)) > 20, i  # caption text
        else:
            assert all(_std(image, box) == 0 for box in boxes), i  # empty slots
    again = tmp_path / "again.png"
    main_exit(["inspect", run_dir, "--png", str(again), "--n", "6"])
    assert again.read_bytes() == path.read_bytes()  # deterministic


def main_exit(args):
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code


def test_sample_is_sorted_captioned_and_episode_filtered(run_dir):
    run = inspect_run.Run(run_dir)
    rows = inspect_run.sample_pairs(run, 5)
    assert len(rows) == 5 and all(r["cond_image"] and r["target_image"] for r in rows)
    assert [r["similarity"] for r in rows] == sorted(r["similarity"] for r in rows)
    episodes = pc.value_counts(pq.read_table(f"{run_dir}/pairs", columns=["episode_id"])[0])
    episode, count = max((e["counts"], e["values"]) for e in episodes.to_pylist())[::-1]
    mine = inspect_run.sample_pairs(run, 100, episode=episode)
    assert len(mine) == count and {r["episode_id"] for r in mine} == {episode}
    assert len(inspect_run.sample_pairs(run, 2, episode=episode)) == 2
    assert inspect_run.pair_caption(mine[0]).endswith(
        "pics.example.com" if "pics" in mine[0]["page_url"] else "photos.example.org"
    )


def test_episode_flag_and_errors(run_dir, tmp_path, capsys):
    episode = pq.read_table(f"{run_dir}/pairs", columns=["episode_id"])[0][0].as_py()
    path = tmp_path / "ep.png"
    assert main_exit(["inspect", run_dir, "--png", str(path), "--episode", episode]) == 0
    assert path.exists()
    capsys.readouterr()
    assert main_exit(["inspect", run_dir, "--png", str(path), "--episode", "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert main_exit(["inspect", str(tmp_path / "missing")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main_exit(["inspect", "--help"]) == 0
    assert "--episode" in capsys.readouterr().out


def test_hist_counts_equal_the_pipeline(run_dir):
    manifest = _manifest(run_dir)
    result = hist.histogram_run(run_dir, by_domain=True)
    assert result.candidates == manifest["counts"]["candidate_pairs"]
    assert result.kept == manifest["counts"]["kept_pairs"]
    assert {d.domain for d in result.domains} == {"photos.example.org", "pics.example.com"}
    assert sum(d.kept for d in result.domains) == result.kept


def test_examples_sheet_rows_per_bin(run_dir, tmp_path, capsys):
    path = tmp_path / "examples.png"
    assert main_exit(["hist", run_dir, "--examples", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    examples = hist.sample_examples(run_dir)
    sheet, layout = hist.examples_sheet(run_dir, examples)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[:2] == (layout.size[1], layout.size[0])
    assert np.array_equal(image, np.asarray(sheet))
    assert layout.rows == len(examples) >= 3 and layout.columns == 3
    total = sum(b.count for b in examples)
    assert total == _manifest(run_dir)["counts"]["candidate_pairs"]
    for r, b in enumerate(examples):
        assert len(b.pairs) == min(3, b.count)
        assert all(b.lo <= p["similarity"] < b.hi or b.hi == 1.0 for p in b.pairs)
        assert _dark(image, layout.label_box(r)) > 20  # the bin's label
        for c in range(len(b.pairs)):
            assert _std(image, layout.image_box(r, c, 0)) > 10
            assert _std(image, layout.image_box(r, c, 1)) > 10
            assert _dark(image, layout.caption_box(r, c)) > 20
    assert hist.sample_examples(run_dir)[0].pairs == examples[0].pairs  # deterministic


def test_thumbnail_applies_exif_orientation_and_letterboxes(jpeg_of, photos):
    import io

    name = photos[0][0]
    wide = Image.open(io.BytesIO(jpeg_of(name, size=(200, 100))))
    exif = wide.getexif()
    exif[0x0112] = 6  # rotate 90°: displayed tall
    buffer = io.BytesIO()
    wide.save(buffer, format="JPEG", exif=exif)
    cell = np.asarray(contact.thumbnail(buffer.getvalue(), 64))
    assert cell.shape == (64, 64, 3)
    letterbox = np.array(contact.LETTERBOX)
    # Displayed 100x200 (tall) in a 64 square: 32 wide, bands left and right.
    assert (cell[:, :14] == letterbox).all() and (cell[:, -14:] == letterbox).all()
    assert not (cell[:, 20:44] == letterbox).all(axis=-1).all()
    broken = np.asarray(contact.thumbnail(b"not an image", 32))
    assert (broken == np.array(contact.MISSING)).all(axis=-1).any()


def test_tfrecord_pairs_summarize_and_sample(run_dir, tmp_path):
    pytest.importorskip("pairmill.tfrecord")
    import schemas
    from pairmill.shards import get_writer

    copy = tmp_path / "tfrun"
    shutil.copytree(run_dir, copy)
    manifest = _manifest(run_dir)
    rows = pq.read_table(f"{run_dir}/pairs").to_pylist()
    # Two shards, each sorted by pair id as the pipeline writes them.
    parts = [sorted(rows[i::2], key=lambda r: r["pair_id"]) for i in range(2)]
    shutil.rmtree(copy / "pairs")
    (copy / "pairs").mkdir()
    shards = []
    for i, part in enumerate(parts):
        path = f"pairs/pairs-{i:05d}-of-00002.tfrecord"
        (copy / path).write_bytes(get_writer("tfrecord").encode(part, schemas.load("pair")))
        shards.append({"path": path, "rows": len(part), "bytes": (copy / path).stat().st_size})
    manifest["tables"]["pairs"].update(format="tfrecord", shards=shards)
    (copy / "manifest.json").write_text(json.dumps(manifest))

    summary = inspect_run.summarize(inspect_run.Run(str(copy)))
    assert summary["top_domains"] == inspect_run.summarize(inspect_run.Run(run_dir))["top_domains"]
    sample = inspect_run.sample_pairs(inspect_run.Run(str(copy)), 4)
    assert len(sample) == 4 and all(r["cond_image"] and r["target_image"] for r in sample)
    by_id = {row["pair_id"]: row for row in rows}
    assert all(r["target_image"] == by_id[r["pair_id"]]["target_image"] for r in sample)
    assert main_exit(["inspect", str(copy), "--png", str(tmp_path / "t.png"), "--n", "3"]) == 0


def test_bottom_k_is_uniform_per_group_and_independent_of_batching():
    import pyarrow as pa

    n = 10_000
    groups = np.arange(n) % 3
    groups[::10] = -1  # skipped rows
    batch = pa.record_batch({"i": np.arange(n)})

    def sample(size):
        sampler = inspect_run.BottomK(3, 5, seed=7)
        for start in range(0, n, size):
            sampler.offer(groups[start : start + size], batch.slice(start, size))
        return [[row["i"] for row in sampler.rows(g)] for g in range(3)]

    whole = sample(n)
    assert whole == sample(777) == sample(64)
    for g, picked in enumerate(whole):
        assert len(set(picked)) == 5 and all(groups[i] == g for i in picked)
    spread = np.concatenate([_five_of_10k(seed) for seed in range(40)])
    assert spread.min() < n / 10 and spread.max() > 9 * n / 10  # not just the first rows


def _five_of_10k(seed):
    import pyarrow as pa

    sampler = inspect_run.BottomK(1, 5, seed=seed)
    sampler.offer(np.zeros(10_000, dtype=np.int64), pa.record_batch({"i": np.arange(10_000)}))
    return np.array([row["i"] for row in sampler.rows(0)])
