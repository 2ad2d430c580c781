"""`pairmill calibrate`: exact proposed thresholds (ties included) that keep what they promise."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from pairmill import calibrate, hist
from pairmill.cli import main
from pairmill.errors import InputError

F32 = np.float32


def write_run(root, values, *, low=0.3, high=0.9, shards=2, row_group=3):
    """A run directory holding only similarities (split over shards and row groups)."""
    (root / "similarities").mkdir(parents=True)
    listed = []
    for i, part in enumerate(np.array_split(np.asarray(values, dtype=F32), shards)):
        n = len(part)
        table = pa.table(
            {
                "pair_id": [f"p{i}-{j}" for j in range(n)],
                "episode_id": ["e"] * n,
                "cond_image_id": ["a"] * n,
                "target_image_id": ["b"] * n,
                "similarity": part,
                "kept": np.zeros(n, dtype=bool),
            },
            schema=schemas.load("similarity").arrow(),
        )
        path = f"similarities/similarities-{i:05d}-of-{shards:05d}.parquet"
        pq.write_table(table, root / path, row_group_size=row_group)
        listed.append({"path": path, "rows": n})
    manifest = {
        "encoder": {"name": "clip-vitb32", "weights": {"description": "hub", "semantic": True}},
        "thresholds": {"low": low, "high": high},
        "counts": {"candidate_pairs": len(values)},
        "tables": {"similarities": {"format": "parquet", "shards": listed}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def tenths(*values):
    return [F32(round(v, 2)) for v in values]


def test_keep_fraction_picks_the_kth_largest_below_high(tmp_path):
    run = write_run(tmp_path / "r", tenths(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
    p = calibrate.keep_fraction(run, 1 / 3)  # 9 candidates <= 0.9: keep 3 (0.9, 0.8, 0.7)
    assert (p.low, p.high, p.kept, p.target, p.candidates, p.below_high) == (0.7, 0.9, 3, 3, 10, 9)
    assert calibrate.keep_fraction(run, 1.0).low == 0.1
    assert calibrate.keep_fraction(run, 0.01).low == 0.9  # at least one pair
    assert calibrate.keep_fraction(run, 0.5, high=0.45).low == 0.3  # 4 below: keep 2


def test_ties_keep_the_fewest_pairs_not_fewer_than_the_target(tmp_path):
    run = write_run(tmp_path / "r", tenths(0.1, 0.5, 0.5, 0.5, 0.8, 0.95))
    p = calibrate.keep_fraction(run, 0.4)  # 5 candidates <= 0.9: target 2
    assert (p.low, p.target, p.kept) == (0.5, 2, 4)
    assert "ties" in calibrate.format_proposal(p)
    assert hist.histogram_run(run, low=p.low).kept == p.kept


def test_second_pass_resolves_values_inside_one_fine_bin(tmp_path):
    # 100 consecutive float32 values from 0.5 up: all in one fine bin (2 / 65536 wide).
    close = [F32(0.5)]
    for _ in range(99):
        close.append(np.nextafter(close[-1], F32(1)))
    values = [*close, *tenths(-0.4, 0.1, 0.45, 0.95)]
    run = write_run(tmp_path / "r", values, shards=3, row_group=7)
    k = 10
    first = calibrate.fine_histogram(lambda: hist.similarity_values(hist.Run(run)), 0.9)
    rank = calibrate.kth_largest(lambda: hist.similarity_values(hist.Run(run)), k, 0.9, first)
    assert rank.value == close[-k] and rank.at_least == k and rank.total == 103


def test_matches_brute_force_on_many_tied_values(tmp_path):
    rng = np.random.default_rng(3)
    values = np.round(rng.normal(0.5, 0.25, 100_000), 3).astype(F32)  # heavy ties
    run = write_run(tmp_path / "r", values, shards=3, row_group=8192)
    base = np.sort(values[values <= F32(0.9)])[::-1]
    for fraction in (0.05, 0.3, 0.777, 1.0):
        p = calibrate.keep_fraction(run, fraction)
        k = calibrate.target_for_fraction(fraction, len(base))
        assert F32(p.low) == base[k - 1]
        assert p.kept == int((base >= base[k - 1]).sum())
        assert hist.histogram_run(run, low=p.low).kept == p.kept  # the band keeps the promise


def test_match_keeps_as_many_pairs_as_the_other_run(tmp_path):
    # The reference (say DINOv2, band 0.3..0.9) keeps 0.3, 0.5, 0.6, 0.9: 4 pairs.
    other = write_run(tmp_path / "dino", tenths(0.1, 0.3, 0.5, 0.6, 0.9, 0.95), low=0.3)
    values = [F32(round(0.05 * i, 2)) for i in range(1, 21)]  # 0.05 .. 1.0
    run = write_run(tmp_path / "clip", values, low=0.65, high=0.95)
    p = calibrate.match(run, other)
    assert (p.low, p.high, p.kept, p.target) == (0.8, 0.95, 4, 4)  # 0.95, 0.9, 0.85, 0.8
    assert "match" in p.reference
    assert hist.histogram_run(run, low=p.low).kept == 4
    small = write_run(tmp_path / "small", tenths(0.5, 0.6))
    with pytest.raises(InputError, match="only 2 candidates"):
        calibrate.match(small, other)


def test_distinct_values_of_a_bin_collapse_ties():
    values = [np.full(500_000, F32(0.25)), np.full(500_000, F32(0.25))]
    target = int(hist.bin_index(np.array([F32(0.25)]), calibrate.FINE_BINS)[0])
    distinct, counts = calibrate._bin_values(lambda: iter(values), target, F32(0.9))
    assert distinct.tolist() == [F32(0.25)] and counts.tolist() == [1_000_000]


def test_shortest_float_round_trips():
    for value in (F32(0.3), F32(0.1) + F32(1e-7), np.nextafter(F32(0.9), F32(1))):
        assert F32(calibrate.shortest_float(value)) == value
    assert calibrate.shortest_float(F32(0.3)) == 0.3


def test_cli_json_help_and_errors(tmp_path, capsys):
    run = write_run(tmp_path / "r", tenths(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", run, "--keep-fraction", "0.5", "--json"])
    assert exc.value.code == 0
    assert json.loads(capsys.readouterr().out) == {
        "low": 0.5,
        "high": 0.9,
        "kept": 5,
        "candidates": 10,
    }
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", run, "--keep-fraction", "0.5", "--high", "0.45"])
    out = capsys.readouterr().out
    assert "--low 0.3 --high 0.45" in out and "keeps     2 of 10" in out
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--help"])
    assert exc.value.code == 0 and "--keep-fraction" in capsys.readouterr().out
    for args, code in (
        ([run], 2),  # neither flag
        ([run, "--keep-fraction", "0.5", "--match", run], 2),
        ([run, "--keep-fraction", "1.5"], 2),
        ([str(tmp_path / "missing"), "--keep-fraction", "0.5"], 1),
        ([run, "--match", str(tmp_path / "missing")], 1),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["calibrate", *args])
        assert exc.value.code == code, args
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_proposal_reproduces_in_a_real_build(tmp_path, sample_crawl):
    from pipelines import build_pairs

    def build(out, *band):
        args = [str(sample_crawl), "--out", str(out), "--encoder", "tiny", "--device", "cpu"]
        return build_pairs.run([*args, *band]).pairmill_manifest

    build(tmp_path / "base")
    p = calibrate.keep_fraction(str(tmp_path / "base"), 0.5)
    again = build(tmp_path / "again", "--low", str(p.low), "--high", str(p.high))
    assert again["counts"]["kept_pairs"] == p.kept
    assert again["counts"]["candidate_pairs"] == p.candidates
