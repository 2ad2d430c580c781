"""`pairmill eval`: the few-shot metrics of a checkpoint (FID, precision/recall, copy, align)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from pairmill.errors import ConfigError, InputError
from pairmill.train import evaluate as ev
from pairmill.train.loop import TrainConfig, train
from pipelines import build_pairs

KEYS = {"guidance", "fid", "precision", "recall", "copy_rate", "alignment", "feature_space", "n"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(sample_crawl, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = [str(sample_crawl), "--out", str(out), "--encoder", "tiny", "--device", "cpu"]
    build_pairs.run([*argv, "--low", "-1", "--high", "0.99"])
    return out


@pytest.fixture(scope="module")
def ckpt(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    config = TrainConfig(
        shards=[str(run_dir)], out=str(out), image_size=16, batch_size=4, steps=2,
        shuffle_buffer=8, log_every=1, ckpt_every=2, seed=3,
    )  # fmt: skip
    torch.set_num_threads(1)
    train(config, echo=lambda _: None)
    return out / "latest.pt"


def fast(**overrides) -> ev.EvalConfig:
    return ev.EvalConfig(**{"steps": 2, "n_test": 12, "seed": 1, **overrides})


def test_eval_rows_have_the_json_shape_and_are_deterministic(ckpt, run_dir):
    first = ev.evaluate(ckpt, run_dir, fast())
    assert len(first.rows) == 1
    row = first.rows[0]
    assert set(row) >= KEYS
    assert row["n"] == 12 and row["guidance"] == 0.5
    assert row["feature_space"] == "encoder:tiny (random weights, not semantic)"
    assert row["copy_threshold"] == 0.99  # the training corpus's upper threshold
    for key in ("precision", "recall", "copy_rate"):
        assert 0.0 <= row[key] <= 1.0
    assert np.isfinite(row["fid"]) and -1.0 <= row["alignment"] <= 1.0
    # One group per episode: K conditioning images, the N samples split among them.
    k = len(first.cond_index)
    assert row["k"] == k and sum(len(s) for s in first.samples[0.5]) == 12
    again = ev.evaluate(ckpt, run_dir, fast())
    assert again.rows == first.rows
    assert json.loads(json.dumps(again.rows)) == again.rows


def test_a_model_returning_its_condition_copies_everything(ckpt, run_dir):
    def copies(_emb, cond_pixels, n, _guidance, _seed):
        return np.repeat(cond_pixels[:, None], n, axis=1)

    row = ev.evaluate(ckpt, run_dir, fast(), generate_fn=copies).rows[0]
    assert row["copy_rate"] == 1.0
    assert row["alignment"] == pytest.approx(1.0)
    assert row["precision"] == 1.0  # copies of test images lie on the test manifold

    def noise(emb, _pixels, n, _guidance, seed):
        rng = np.random.default_rng(seed)
        return rng.integers(0, 256, size=(len(emb), n, 16, 16, 3), dtype=np.uint8)

    row = ev.evaluate(ckpt, run_dir, fast(), generate_fn=noise).rows[0]
    assert row["copy_rate"] == 0.0


def test_pick_conditions_takes_shots_per_group():
    groups = ["a"] * 5 + ["b"] * 4 + ["c"] * 1
    chosen, counts = ev.pick_conditions(groups, 2, np.random.default_rng(0))
    assert [groups[i] for i in chosen] == ["a", "a", "b", "b", "c"]  # "c" has only one
    assert sum(counts) == len(groups) and counts == [2, 2, 2, 2, 2]
    chosen, counts = ev.pick_conditions(groups, 3, np.random.default_rng(0))
    assert len(chosen) == 7 and counts == [2, 2, 2, 1, 1, 1, 1]  # 10 = 7 * 1 + 3


def test_folder_groups_are_sub_folders(tmp_path, jpeg_of):
    for group in ("cats", "dogs"):
        (tmp_path / group).mkdir()
        for i in range(2):
            (tmp_path / group / f"{i}.jpg").write_bytes(jpeg_of("chelsea", (40, 40)))
    tests = ev.load_test_set(tmp_path)
    assert tests.groups == ["cats", "cats", "dogs", "dogs"]
    flat = ev.load_test_set(str(tmp_path / "*" / "*.jpg"))
    assert len(flat) == 4 and set(flat.groups) == {"."}


def test_guidance_sweep_and_precision_recall_png(ckpt, run_dir, tmp_path):
    result = ev.evaluate(ckpt, run_dir, fast(guidance=(0.0, 1.0, 3.0)))
    assert [r["guidance"] for r in result.rows] == [0.0, 1.0, 3.0]
    png = tmp_path / "pr.png"
    labels = ev.plot_precision_recall(result.rows, png)
    assert labels == ("recall (k=3)", "precision (k=3)")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_errors_are_config_or_input_errors(tmp_path, run_dir, ckpt):
    with pytest.raises(InputError, match="no checkpoint"):
        ev.evaluate(tmp_path / "missing.pt", run_dir, fast())
    with pytest.raises(ConfigError, match="--shots"):
        ev.evaluate(ckpt, run_dir, fast(shots=0))
    with pytest.raises(InputError, match="no test images"):
        ev.evaluate(ckpt, str(tmp_path / "none-*.png"), fast())


@pytest.fixture(scope="module")
def cli():
    from pairmill.cli import cmd_eval

    app = typer.Typer()
    cmd_eval.register(app)
    app.command(name="noop")(lambda: None)  # keeps `eval` a sub-command
    return app


def test_eval_cli_json_and_png(cli, ckpt, run_dir, tmp_path):
    png = tmp_path / "pr.png"
    args = ["eval", str(ckpt), "--test", str(run_dir), "--n-test", "12", "--steps", "2"]
    args += ["--guidance", "0", "--guidance", "2", "--png", str(png), "--json", "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["guidance"] for r in rows] == [0.0, 2.0] and set(rows[0]) >= KEYS
    assert png.is_file()


def test_eval_cli_missing_checkpoint_is_one_line(tmp_path, run_dir, capsys):
    from pairmill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path / "nope.pt"), "--test", str(run_dir), "--json"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("pairmill: error: no checkpoint at") and "\n" not in err


@pytest.mark.slow  # FID on 2048-d features needs a 2048x2048 matrix square root: ~15 s
def test_eval_cli_scores_in_inception_space_with_local_weights(
    cli, ckpt, run_dir, tmp_path, monkeypatch
):
    import torch

    from pairmill.train import inception
    from pairmill.train.inception import build_fid_inception

    monkeypatch.setattr(inception, "INPUT_SIZE", 75)  # Inception's smallest input: a fast test

    torch.manual_seed(0)
    weights = tmp_path / "fid_inception.pth"
    torch.save(build_fid_inception().state_dict(), weights)  # seeded random: a smoke test
    args = ["eval", str(ckpt), "--test", str(run_dir), "--n-test", "12", "--steps", "2"]
    args += ["--guidance", "0", "--device", "cpu", "--inception-weights", str(weights)]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)[0]
    assert {"fid@inception", "precision@inception", "recall@inception"} <= set(row)
    # A cosine copy threshold means nothing in Inception space: no copy-rate there.
    assert "copy_rate@inception" not in row and row["fid@inception"] >= 0
    assert "(Inception)" in ev.format_table([row])


def test_a_space_without_threshold_has_no_copy_rate(ckpt, run_dir):
    def colour_stats(pixels):
        flat = pixels.reshape(len(pixels), -1, 3).astype(np.float64)
        return np.concatenate([flat.mean(axis=1), flat.std(axis=1)], axis=1)

    spaces = {"colour": colour_stats, "colour2": colour_stats}
    rows = ev.evaluate(ckpt, run_dir, fast(), None, spaces, {"colour": None}).rows
    assert {"fid@colour", "precision@colour", "recall@colour"} <= set(rows[0])
    assert "copy_rate@colour" not in rows[0] and "alignment@colour" not in rows[0]
    assert "copy_rate@colour2" in rows[0]  # no entry: the encoder space's threshold


def test_eval_without_inception_weights_says_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.delenv("PAIRMILL_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    features, thresholds, note = ev.inception_space(None)
    assert features == {} and thresholds == {}
    assert "pt_inception-2015-12-05-6726825d.pth" in note and "encoder's space only" in note
