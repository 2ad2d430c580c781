"""The README's loading snippets (pairmill, pandas, DuckDB, Hugging Face datasets), run as
written on a real build. The snippets are kept here, verbatim, and the README must quote
them exactly, so the documentation cannot drift from code that works."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import build_pairs

README = Path(__file__).resolve().parents[1] / "README.md"
README_HEADING = "## Loading the pairs"
RUN = "runs/demo/run"  # the path the snippets use; the tests substitute a fresh build

PAIRMILL = textwrap.dedent("""\
    from torch.utils.data import DataLoader
    from pairmill.data import PairShards, read_pairs

    dataset = PairShards("runs/demo/run", shuffle_buffer=1000, image_size=256)
    loader = DataLoader(dataset, batch_size=32, num_workers=4)
    batch = next(iter(loader))  # cond_image, target_image: uint8 [32, 3, 256, 256]

    # Without torch: plain dicts (image bytes, float32 numpy embeddings).
    first = next(read_pairs("runs/demo/run/pairs/*.parquet", columns=["pair_id", "similarity"]))
    """)

PANDAS = textwrap.dedent("""\
    import pandas as pd

    pairs = pd.read_parquet("runs/demo/run/pairs")  # every pair shard; images are bytes
    print(len(pairs), pairs["similarity"].describe())
    """)

DUCKDB = textwrap.dedent("""\
    import duckdb

    top = duckdb.sql(\"\"\"
        SELECT pair_id, similarity, cond_url, target_url
        FROM 'runs/demo/run/pairs/*.parquet'
        ORDER BY similarity DESC
        LIMIT 5
    \"\"\").df()
    [(count,)] = duckdb.sql("SELECT count(*) FROM 'runs/demo/run/pairs/*.parquet'").fetchall()
    """)

DATASETS = textwrap.dedent("""\
    from datasets import load_dataset

    pairs = load_dataset("parquet", data_files="runs/demo/run/pairs/*.parquet", split="train")
    print(pairs.num_rows, pairs[0]["similarity"])
    """)

SNIPPETS = {"pairmill": PAIRMILL, "pandas": PANDAS, "duckdb": DUCKDB, "datasets": DATASETS}


@pytest.fixture(scope="module")
def run_dir(sample_crawl, tmp_path_factory):
    out = tmp_path_factory.mktemp("readme-run")
    argv = [str(sample_crawl), "--out", str(out), "--encoder", "tiny", "--device", "cpu"]
    build_pairs.run(argv)
    return out


@pytest.fixture(scope="module")
def similarity(run_dir):
    """pair_id -> similarity, as pyarrow reads it."""
    table = pq.read_table(run_dir / "pairs", columns=["pair_id", "similarity"])
    return dict(zip(*table.to_pydict().values(), strict=True))


def run_snippet(name: str, run_dir: Path) -> dict:
    code = SNIPPETS[name].replace(RUN, str(run_dir))
    namespace: dict = {}
    exec(compile(code, f"<README {name} snippet>", "exec"), namespace)
    return namespace


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_pairmill_snippet(run_dir, similarity):
    pytest.importorskip("torch")
    ns = run_snippet("pairmill", run_dir)
    batch = ns["batch"]
    assert batch["cond_image"].shape == (min(32, len(similarity)), 3, 256, 256)
    assert batch["similarity"][0].item() == similarity[batch["pair_id"][0]]
    assert ns["first"]["similarity"] == similarity[ns["first"]["pair_id"]]


def test_pandas_snippet(run_dir, similarity):
    pytest.importorskip("pandas")
    pairs = run_snippet("pandas", run_dir)["pairs"]
    assert len(pairs) == len(similarity) > 0
    row = pairs.iloc[0]
    assert float(row["similarity"]) == similarity[row["pair_id"]]
    assert isinstance(row["cond_image"], bytes)


def test_duckdb_snippet(run_dir, similarity):
    pytest.importorskip("duckdb")
    ns = run_snippet("duckdb", run_dir)
    assert ns["count"] == len(similarity) > 0
    assert float(ns["top"]["similarity"].iloc[0]) == max(similarity.values())


def test_datasets_snippet(run_dir, similarity, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    # Keep the Arrow cache load_dataset writes out of the user's home directory.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    pairs = run_snippet("datasets", run_dir)["pairs"]
    assert pairs.num_rows == len(similarity) > 0
    assert pairs[0]["similarity"] == similarity[pairs[0]["pair_id"]]


def test_readme_quotes_the_snippets():
    text = README.read_text()
    if README_HEADING not in text:
        pytest.skip(f"README.md has no '{README_HEADING}' section yet")
    for name, code in SNIPPETS.items():
        assert f"```python\n{code}```" in text, f"README's {name} snippet differs from the test's"
