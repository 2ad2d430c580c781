"""`pairmill hist`: exact band counts, bins, streaming memory, text, JSON and PNG pixels."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import schemas
from pairmill import hist
from pairmill.cli import main

F32 = np.float32
ABOVE_03 = F32(0.3)  # float32(0.3) = 0.30000001… > 0.3
BELOW_09 = F32(0.9)  # float32(0.9) = 0.89999998… < 0.9
# Ten values around the band 0.3..0.9; value i occurs i + 1 times.
VALUES = np.array(
    [
        -1.0,
        -0.5,
        0.0,
        np.nextafter(ABOVE_03, F32(-1)),  # just below low
        ABOVE_03,  # exactly low: kept (inclusive)
        0.5,
        BELOW_09,  # exactly high: kept
        np.nextafter(BELOW_09, F32(2)),  # just above high
        1.0,
        np.nextafter(F32(1), F32(2)),  # rounding can push a cosine past 1
    ],
    dtype=F32,
)
BELOW, KEPT, ABOVE = 1 + 2 + 3 + 4, 5 + 6 + 7, 8 + 9 + 10


def write_run(root, shards, *, low=0.3, high=0.9, episodes=None, domains=None, row_group=7):
    """A run directory with similarities shards (several row groups each) and a manifest."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "similarities").mkdir()
    listed = []
    for i, values in enumerate(shards):
        n = len(values)
        eps = episodes[i] if episodes else [f"e{j % 3}" for j in range(n)]
        table = pa.table(
            {
                "pair_id": [f"p{i}-{j:07d}" for j in range(n)],
                "episode_id": eps,
                "cond_image_id": ["a"] * n,
                "target_image_id": ["b"] * n,
                "similarity": np.asarray(values, dtype=F32),
                "kept": np.zeros(n, dtype=bool),
            },
            schema=schemas.load("similarity").arrow(),
        )
        path = f"similarities/similarities-{i:05d}-of-{len(shards):05d}.parquet"
        pq.write_table(table, root / path, row_group_size=row_group)
        listed.append({"path": path, "rows": n, "bytes": (root / path).stat().st_size})
    tables = {"similarities": {"format": "parquet", "shards": listed}}
    if domains:
        (root / "images").mkdir()
        pq.write_table(
            pa.table({"episode_id": list(domains), "page_url": list(domains.values())}),
            root / "images/images-00000-of-00001.parquet",
            row_group_size=2,
        )
        tables["images"] = {
            "format": "parquet",
            "shards": [{"path": "images/images-00000-of-00001.parquet"}],
        }
    manifest = {
        "encoder": {
            "name": "tiny",
            "weights": {"description": "random (seed 0)", "semantic": False},
        },
        "thresholds": {"low": low, "high": high},
        "counts": {"candidate_pairs": sum(len(s) for s in shards)},
        "tables": tables,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


@pytest.fixture
def band_run(tmp_path):
    values = np.repeat(VALUES, np.arange(1, 11))
    np.random.default_rng(0).shuffle(values)
    return write_run(tmp_path / "run", [values[:30], values[30:]])


def test_counts_are_exact_with_inclusive_float32_edges(band_run):
    result = hist.histogram_run(band_run, bins=4)
    assert (result.below, result.kept, result.above) == (BELOW, KEPT, ABOVE)
    assert result.candidates == 55 and result.nan == 0
    # Edges -1, -0.5, 0, 0.5, 1: an edge value opens its bin; values past 1 go to the last.
    assert result.counts.tolist() == [1, 2, 3 + 4 + 5, 6 + 7 + 8 + 9 + 10]
    assert result.edges.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]


@pytest.mark.parametrize("bins", [4, 5, 40, 1 << 16])
def test_bin_index_is_exact_at_edges_and_for_tiny_values(bins):
    tiny = np.array([-1e-30, -1e-45, 1e-45, 0.0, -0.0], dtype=F32)
    zero_bin = bins // 2  # the bin holding 0 (or opening at 0 when bins is even)
    below_zero = zero_bin - 1 if bins % 2 == 0 else zero_bin
    assert hist.bin_index(tiny, bins).tolist() == [below_zero] * 2 + [zero_bin] * 3
    edges = hist.bin_edges(bins)
    on_edge = edges[:-1].astype(F32)
    exact = on_edge.astype(np.float64) == edges[:-1]  # edges that are float32 numbers
    got = hist.bin_index(on_edge, bins)
    assert (got[exact] == np.arange(bins)[exact]).all()
    below = np.nextafter(on_edge[1:][exact[1:]], F32(-2))
    assert (hist.bin_index(below, bins) == np.arange(bins - 1)[exact[1:]]).all()


def test_thresholds_are_compared_in_float32_like_the_pipeline(band_run):
    # float32(0.3) > 0.3: a float64 comparison would call it above high=0.3.
    assert hist.histogram_run(band_run, low=-1, high=0.3).kept == 1 + 2 + 3 + 4 + 5
    # float32(0.9) < 0.9: a float64 comparison would call it below low=0.9.
    assert hist.histogram_run(band_run, low=0.9, high=1.0).kept == 7 + 8 + 9
    rng = np.random.default_rng(1)
    values = rng.uniform(-1, 1, 5000).astype(F32)
    acc = hist.BandHistogram(0.1, 0.7, 40)
    acc.add(values)
    assert acc.kept == int(((values >= F32(0.1)) & (values <= F32(0.7))).sum())


def test_nan_counts_apart_and_band_override(tmp_path):
    run = write_run(tmp_path / "r", [np.array([0.5, np.nan, 0.95, 0.1], F32)])
    result = hist.histogram_run(run, low=0.2)
    assert (result.below, result.kept, result.above, result.nan) == (1, 1, 1, 1)
    assert (result.low, result.high) == (0.2, 0.9)
    assert result.to_json()["nan"] == 1


def test_json_shape_one_and_several_runs(band_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["hist", band_run, "--json", "--bins", "8"])
    assert exc.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {
        "run",
        "encoder",
        "candidates",
        "below",
        "kept",
        "above",
        "low",
        "high",
        "bins",
    }
    assert (data["below"], data["kept"], data["above"], data["candidates"]) == (10, 18, 27, 55)
    assert len(data["bins"]) == 8 and data["bins"][0] == {"lo": -1.0, "hi": -0.75, "count": 1}
    assert sum(b["count"] for b in data["bins"]) == 55
    other = write_run(tmp_path / "other", [np.array([0.4, 0.95], F32)])
    with pytest.raises(SystemExit):
        main(["hist", band_run, other, "--json"])
    both = json.loads(capsys.readouterr().out)
    assert [d["candidates"] for d in both] == [55, 2] and both[1]["kept"] == 1


def test_terminal_output_has_bars_counts_and_warning(band_run, capsys):
    with pytest.raises(SystemExit):
        main(["hist", band_run, "--bins", "20"])
    out = capsys.readouterr().out
    assert "below 10 (18.2%), kept 18 (32.7%), above 27 (49.1%)" in out
    assert "not semantic" in out and "random (seed 0)" in out
    bar_lines = [line for line in out.splitlines() if line[:1] in "+-" and "." in line[:6]]
    assert len(bar_lines) == 20  # populated from the first bin (-1) to the last (1)
    in_band = [line for line in bar_lines if "┃" in line]
    assert len(in_band) == 6  # 0.3 .. 0.9
    assert all(("█" in line) == (not line.endswith(" 0")) for line in in_band)
    assert not any("█" in line for line in bar_lines if "┃" not in line)
    assert any(line.startswith("+0.30 +0.40 ┃") for line in in_band)


def test_by_domain_joins_episodes_to_page_domains(tmp_path):
    domains = {
        "e0": "https://www.a.example/1",
        "e1": "https://b.example/x",
        "e2": "https://a.example/2",
    }
    values = np.array([0.1, 0.5, 0.95, 0.5, 0.6, 0.5], F32)
    episodes = [["e0", "e0", "e0", "e1", "e1", "e2"]]
    run = write_run(tmp_path / "r", [values], episodes=episodes, domains=domains, row_group=4)
    result = hist.histogram_run(run, by_domain=True)
    got = [d.to_json() for d in result.domains]
    assert got == [
        {"domain": "a.example", "candidates": 4, "below": 1, "kept": 2, "above": 1},
        {"domain": "b.example", "candidates": 2, "below": 0, "kept": 2, "above": 0},
    ]
    assert (result.below, result.kept, result.above) == (1, 4, 1)
    assert "a.example" in hist.format_text(result)


def test_streams_two_million_rows_in_bounded_memory(tmp_path):
    n = 2_000_000
    values = np.random.default_rng(2).normal(0.4, 0.3, n).astype(F32)
    half = n // 2
    run = write_run(
        tmp_path / "big",
        [values[:half], values[half:]],
        episodes=[["e"] * half, ["e"] * half],
        row_group=250_000,
    )
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        result = hist.histogram_run(run)
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)
    column_bytes = 4 * n  # the similarity column alone, as float32
    assert numpy_peak < column_bytes / 4, numpy_peak
    assert pool.max_memory() < column_bytes / 4, pool.max_memory()
    low, high = F32(0.3), F32(0.9)
    assert result.kept == int(((values >= low) & (values <= high)).sum())
    assert result.below == int((values < low).sum()) and result.candidates == n


def _pixel(image: np.ndarray, fig, x: float, y_axes: float) -> np.ndarray:
    """The RGB pixel at data x and axes-fraction y of the saved PNG."""
    ax = fig.axes[0]
    px = ax.transData.transform((x, 0))[0]
    py = ax.transAxes.transform((0, y_axes))[1]
    return image[int(round(image.shape[0] - py)), int(round(px))][:3].astype(int)


def test_png_shades_the_band(band_run, tmp_path):
    path = tmp_path / "h.png"
    fig = hist.plot_histograms([hist.histogram_run(band_run, bins=20)], path)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[:2] == (480, 800)
    for x in (0.35, 0.6, 0.85):  # inside the band, above the bars
        r, g, b = _pixel(image, fig, x, 0.97)
        assert r > 240 and b < 215 and r - b > 30, (x, r, g, b)
    for x in (-0.7, 0.2, 0.95):  # outside: white
        assert (_pixel(image, fig, x, 0.97) > 250).all(), x


def _near(image: np.ndarray, colour: str) -> int:
    from matplotlib.colors import to_rgb

    target = np.array(to_rgb(colour)) * 255
    return int((np.abs(image[..., :3].astype(float) - target).max(axis=-1) < 25).sum())


def test_png_overlays_runs_in_two_colours(band_run, tmp_path):
    other = write_run(tmp_path / "other", [np.linspace(-0.2, 0.8, 400).astype(F32)])
    path = tmp_path / "two.png"
    fig = hist.plot_histograms([hist.histogram_run(band_run), hist.histogram_run(other)], path)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert _near(image, "C0") > 100 and _near(image, "C1") > 100
    assert fig.axes[0].get_ylabel() == "density"  # counts differ: densities overlay
    one = np.asarray(Image.open(_one_run_png(band_run, tmp_path)).convert("RGB"))
    assert _near(one, "C1") < 20


def _one_run_png(run, tmp_path):
    path = tmp_path / "one.png"
    hist.plot_histograms([hist.histogram_run(run)], path)
    return path


def test_cli_help_errors_and_png_flag(band_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["hist", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--low", "--high", "--bins", "--png", "--by-domain", "--json", "--examples"):
        assert flag in out
    with pytest.raises(SystemExit) as exc:
        main(["hist", str(tmp_path / "missing")])
    assert exc.value.code == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exc:
        main(["hist", band_run, "--low", "0.9", "--high", "0.1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["hist", band_run, "--low", "0.95"])  # above the run's high (0.9)
    assert exc.value.code == 1 and "--low 0.95 is above --high 0.9" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["hist", band_run, "--png", str(tmp_path / "p.png")])
    assert exc.value.code == 0 and (tmp_path / "p.png").stat().st_size > 1000


def test_page_domains_match_urls_domain():
    from pairmill.inspect_run import page_domains
    from pairmill.urls import domain

    urls = [
        "https://www.A.example/x",
        "http://user:pw@www.b.com:8080/p?q=1",
        "https://[2001:DB8::1]:80/x",
        "https://ex.org?x=1",
        "https://ex.org#f",
        "ftp://www.www.x.org/",
        "https://wwwx.org/",
        "notaurl",
        "",
        None,
    ]
    assert page_domains(pa.array(urls, pa.string())) == [domain(u or "") for u in urls]
