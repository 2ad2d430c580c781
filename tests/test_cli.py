"""The command line: exit codes, one-line errors, help."""

import os
import subprocess
import sys

import pytest

from pairmill.cli import main


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-c", "from pairmill.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PAIRMILL_DEBUG": ""},
        timeout=300,
    )


def test_bad_flag_is_one_line_and_exit_2():
    result = run_cli("build", "x.parquet", "--out", "o", "--lwo", "0.3")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--lwo" in lines[0] and "--low" in lines[0]


def test_bad_value_is_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["build", "x.parquet", "--out", "o", "--max-aspect", "wide"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_missing_input_is_one_line_and_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "build",
                str(tmp_path / "missing.parquet"),
                "--out",
                str(tmp_path / "o"),
                "--encoder",
                "tiny",
            ]
        )
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pairmill: error: input not found: {tmp_path / 'missing.parquet'}"]


def test_invalid_band_is_a_config_error(tmp_path, sample_crawl, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "build",
                str(sample_crawl),
                "--out",
                str(tmp_path),
                "--encoder",
                "tiny",
                "--low",
                "0.9",
                "--high",
                "0.3",
            ]
        )
    assert exc.value.code == 1
    assert "--low" in capsys.readouterr().err


def test_unknown_encoder_lists_presets(tmp_path, sample_crawl, capsys):
    with pytest.raises(SystemExit):
        main(["build", str(sample_crawl), "--out", str(tmp_path), "--encoder", "resnet"])
    assert "dinov2-vitb14" in capsys.readouterr().err


def test_offline_without_weights_says_what_to_do(tmp_path, sample_crawl, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit) as exc:
        main(["build", str(sample_crawl), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1
    assert "--weights" in err[0] and "random" in err[0]


@pytest.mark.parametrize("command", [[], ["build"], ["demo"]])
def test_help_is_complete(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    if command == ["build"]:
        for flag in (
            "--out",
            "--encoder",
            "--weights",
            "--low",
            "--high",
            "--format",
            "--max-images-per-episode",
            "--max-pairs-per-episode",
            "--min-side",
            "--max-aspect",
            "--resize",
            "--image-size",
            "--device",
            "--batch-size",
        ):
            assert flag in result.stdout


def test_build_prints_a_summary(tmp_path, sample_crawl, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "build",
                str(sample_crawl),
                "--out",
                str(tmp_path / "o"),
                "--encoder",
                "tiny",
                "--device",
                "cpu",
                "--direct_num_workers",
                "1",
                "--quiet",
            ]
        )
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for label in (
        "records in",
        "images accepted",
        "episodes",
        "candidate pairs",
        "kept pairs",
        "images/s",
        "rejected: duplicate",
    ):
        assert label in out
