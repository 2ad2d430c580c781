"""The companion trainer: model, schedule, loss, samplers, loop/resume, CLI, metrics."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from pairmill.train import metrics
from pairmill.train.diffusion import (
    Schedule,
    diffusion_loss,
    sample,
    v_target,
    v_to_eps,
    v_to_x,
)
from pairmill.train.loop import BatchStream, TrainConfig, load_checkpoint, train
from pairmill.train.model import MODELS, build_model, model_config
from pipelines import build_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(sample_crawl, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = [str(sample_crawl), "--out", str(out), "--encoder", "tiny", "--device", "cpu"]
    build_pairs.run([*argv, "--low", "-1", "--high", "1"])
    return out


def tiny(cond_dim: int = 16, image_size: int = 16, seed: int = 0):
    """A tiny denoiser with every weight random (zero-init outputs would make v = 0)."""
    torch.manual_seed(seed)
    model = build_model(model_config("tiny", image_size, cond_dim))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    return model.eval()


def small_config(run_dir, out, **overrides) -> TrainConfig:
    values = dict(
        shards=[str(run_dir)], out=str(out), image_size=16, batch_size=4, steps=3,
        shuffle_buffer=8, log_every=1, ckpt_every=2, seed=3,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


# ---------------------------------------------------------------------------------------------
# Model


def test_model_output_shape_and_null_embedding():
    model = tiny(cond_dim=16, image_size=32)
    z, t, cond = torch.randn(3, 3, 32, 32), torch.rand(3), torch.randn(3, 16)
    v = model(z, t, cond)
    assert v.shape == (3, 3, 32, 32)
    dropped = model(z, t, cond, torch.tensor([True, False, True]))
    assert torch.equal(dropped[1], v[1])
    assert not torch.allclose(dropped[0], v[0])
    # A dropped row ignores its embedding entirely.
    other = model(z, t, torch.randn(3, 16), torch.tensor([True, True, True]))
    assert torch.allclose(other[0], dropped[0], atol=1e-6)


def test_registry_sizes_and_zero_init():
    assert set(MODELS) == {"tiny", "S", "B"}
    model = build_model(model_config("tiny", 32, 8))
    out = model(torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 8))
    assert torch.count_nonzero(out) == 0  # adaLN-Zero and a zero head: starts at v = 0
    with pytest.raises(ValueError, match="unknown model size"):
        model_config("XL", 32, 8)


# ---------------------------------------------------------------------------------------------
# Schedule, parametrisation, loss


def test_schedule_sanity():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for size in (32, 64, 128):
        schedule = Schedule(image_size=size)
        alpha, sigma = schedule.alpha_sigma(t)
        assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(t))
        lam = schedule.logsnr(t)
        assert torch.all(lam[1:] < lam[:-1]) and torch.isfinite(lam).all()
    # Larger images: lower SNR at every t, by exactly 2 log(image_size / 32).
    base, big = Schedule(32).logsnr(t), Schedule(64).logsnr(t)
    assert torch.allclose(base - big, torch.full_like(t, 2 * math.log(2)))
    assert Schedule(32).shift == 0.0
    assert float(base[50]) == pytest.approx(0.0, abs=1e-9)  # the cosine midpoint


def test_v_epsilon_round_trip():
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    alpha, sigma = (a.view(-1, 1, 1, 1) for a in Schedule(16).alpha_sigma(torch.rand(4)))
    z = alpha * x + sigma * eps
    v = v_target(x, eps, alpha, sigma)
    assert torch.allclose(v_to_eps(v, z, alpha, sigma), eps, atol=1e-5)
    assert torch.allclose(v_to_x(v, z, alpha, sigma), x, atol=1e-5)


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(model_config("tiny", 16, 8)).train()
    schedule = Schedule(16)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 16, 16, generator=gen) * 2 - 1
    cond = torch.randn(8, 8, generator=gen)
    t, eps = torch.rand(8, generator=gen), torch.randn(8, 3, 16, 16, generator=gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.99))
    losses = []
    for _ in range(40):
        loss = diffusion_loss(model, schedule, x, cond, t, eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


# ---------------------------------------------------------------------------------------------
# Samplers


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_seeded_sampling_is_deterministic(sampler):
    model, cond = tiny(), torch.randn(3, 16)

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return sample(model, Schedule(16), cond, 4, sampler, 0.5, generator=gen)

    first = draw(7)
    assert first.shape == (3, 3, 16, 16) and first.abs().max() <= 1
    assert torch.equal(first, draw(7))
    assert not torch.equal(first, draw(8))


def test_ddim_differs_from_ddpm():
    model, cond = tiny(), torch.randn(2, 16)
    a = sample(model, Schedule(16), cond, 4, "ddpm", generator=torch.Generator().manual_seed(0))
    b = sample(model, Schedule(16), cond, 4, "ddim", generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a, b)


def test_guidance_zero_is_the_conditional_model():
    model, cond = tiny(), torch.randn(2, 16)

    def draw(guidance):
        gen = torch.Generator().manual_seed(0)
        return sample(model, Schedule(16), cond, 4, "ddpm", guidance, generator=gen)

    def conditional_only(z, t, c, drop):
        assert drop is None  # the unconditional branch is never evaluated
        return model(z, t, c)

    zero, half = draw(0.0), draw(0.5)
    gen = torch.Generator().manual_seed(0)
    direct = sample(conditional_only, Schedule(16), cond, 4, "ddpm", 0.0, generator=gen)
    assert torch.equal(zero, direct)
    with torch.no_grad():
        model.null_cond.add_(1.0)  # changes the unconditional branch only
    assert torch.equal(draw(0.0), zero)
    assert not torch.equal(draw(0.5), half)


# ---------------------------------------------------------------------------------------------
# Data stream, loop, resume


@pytest.mark.parametrize("crop", ["center", "random"])
def test_batch_stream_is_a_function_of_the_step(run_dir, crop):
    stream = BatchStream([str(run_dir)], 16, 8, 8, seed=1, crop=crop, crop_scale=0.5)
    sequence = list(itertools.islice(stream.batches(0), 9))
    rows = stream.epoch_rows
    assert rows is not None and rows < 8 * 16  # the batches cross an epoch boundary
    for known in (None, rows):
        resumed = BatchStream(
            [str(run_dir)], 16, 8, 8, seed=1, epoch_rows=known, crop=crop, crop_scale=0.5
        )
        batch = next(resumed.batches(8))
        assert torch.equal(batch["cond_embedding"], sequence[8]["cond_embedding"])
        assert torch.equal(batch["target_image"], sequence[8]["target_image"])
        assert batch["cond_image"].shape == (16, 3, 8, 8)
        assert batch["cond_image"].dtype == torch.uint8


def test_crop_boxes(jpeg_of):
    from pairmill.data import decode_pixels
    from pairmill.train.loop import crop_draws, decode_crop

    data = jpeg_of("chelsea", (120, 80))
    # The unit box (whole shorter side, centred) is exactly the reader's center crop.
    assert np.array_equal(decode_crop(data, 16, (1.0, 0.5, 0.5)), decode_pixels(data, 16))
    left, right = decode_crop(data, 16, (1.0, 0.0, 0.5)), decode_crop(data, 16, (1.0, 1.0, 0.5))
    assert left.shape == right.shape == (16, 16, 3) and not np.array_equal(left, right)
    boxes = crop_draws(3, 7, 64, 0.6)
    assert boxes.shape == (64, 2, 3) and np.array_equal(boxes, crop_draws(3, 7, 64, 0.6))
    assert not np.array_equal(boxes, crop_draws(3, 8, 64, 0.6))  # another step, other boxes
    assert boxes[..., 0].min() >= 0.6 and boxes[..., 0].max() <= 1.0
    assert boxes[..., 1:].min() >= 0 and boxes[..., 1:].max() < 1


def test_resume_is_bit_identical(run_dir, tmp_path):
    straight = train(small_config(run_dir, tmp_path / "a"), echo=lambda _: None)
    assert straight["step"] == 3
    train(small_config(run_dir, tmp_path / "b", steps=2), echo=lambda _: None)
    lines = []
    train(small_config(run_dir, tmp_path / "b"), echo=lines.append)
    assert lines[0].startswith("resuming from") and "step 2" in lines[0]
    assert_same_checkpoints(tmp_path / "a" / "latest.pt", tmp_path / "b" / "latest.pt", step=3)


def assert_same_checkpoints(path_a, path_b, step: int) -> None:
    """Both at `step` with identical weights, EMA, Adam moments and torch RNG state."""
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a["step"] == b["step"] == step
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    for pid, state in a["optimizer"]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[moment], b["optimizer"]["state"][pid][moment])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_objectives_prepare_the_batch():
    from pairmill.train.loop import prepare_batch

    batch = {
        "cond_image": torch.zeros(64, 3, 4, 4, dtype=torch.uint8),
        "target_image": torch.full((64, 3, 4, 4), 255, dtype=torch.uint8),
        "cond_embedding": torch.zeros(64, 2),
        "target_embedding": torch.ones(64, 2),
    }
    x, cond, tokens = prepare_batch(batch, "reconstruct", torch.Generator().manual_seed(0))
    assert torch.all(x == -1) and torch.all(cond == 0) and tokens is None
    x, cond, tokens = prepare_batch(batch, "pairs", torch.Generator().manual_seed(0))
    assert tokens is None
    flipped = x[:, 0, 0, 0] == -1  # the target is the stored cond side
    assert 0 < int(flipped.sum()) < 64  # about half the pairs swap sides
    # Images and embeddings swap together: the condition is always the other side.
    assert torch.all(cond[flipped] == 1) and torch.all(cond[~flipped] == 0)
    assert torch.all(x[~flipped] == 1)


def test_resume_refuses_a_changed_data_config(run_dir, tmp_path):
    from pairmill.errors import ConfigError
    from pairmill.train.loop import save_checkpoint

    train(small_config(run_dir, tmp_path, steps=1), echo=lambda _: None)
    with pytest.raises(ConfigError, match="batch_size"):
        train(small_config(run_dir, tmp_path, steps=2, batch_size=2), echo=lambda _: None)
    with pytest.raises(ConfigError, match="crop_scale"):
        train(small_config(run_dir, tmp_path, steps=2, crop_scale=0.5), echo=lambda _: None)
    # A checkpoint from before crops and tokens (no such keys) was center-cropped and
    # global-only: it resumes with --crop center and is refused a random crop.
    state = load_checkpoint(tmp_path / "latest.pt")
    for key in ("crop", "crop_scale", "tokens"):
        del state["config"][key]
    del state["model_config"]["token_dim"]
    save_checkpoint(tmp_path / "latest.pt", state)
    with pytest.raises(ConfigError, match="crop='center'"):
        train(small_config(run_dir, tmp_path, steps=2), echo=lambda _: None)
    summary = train(small_config(run_dir, tmp_path, steps=2, crop="center"), echo=lambda _: None)
    assert summary["step"] == 2


def test_checkpoint_contents(run_dir, tmp_path):
    train(small_config(run_dir, tmp_path, steps=2, objective="reconstruct"), echo=lambda _: None)
    names = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert names == ["ckpt-0000002.pt", "latest.pt"]
    ckpt = load_checkpoint(tmp_path / "ckpt-0000002.pt")  # weights_only=True
    assert ckpt["config"]["objective"] == "reconstruct"
    assert ckpt["model_config"]["image_size"] == 16 and ckpt["model_config"]["cond_dim"] == 128
    assert ckpt["encoder"]["name"] == "tiny"
    assert ckpt["encoder"]["weights"]["source"] == "random"


def test_bad_config_fails_before_reading(tmp_path):
    from pairmill.errors import ConfigError

    with pytest.raises(ConfigError, match="--objective"):
        train(TrainConfig(shards=["nowhere"], out=str(tmp_path), objective="copy"))
    with pytest.raises(ConfigError, match="--image-size"):
        train(TrainConfig(shards=["nowhere"], out=str(tmp_path), image_size=30))
    with pytest.raises(ConfigError, match="--crop-scale"):
        train(TrainConfig(shards=["nowhere"], out=str(tmp_path), crop_scale=0.0))
    with pytest.raises(ConfigError, match="--crop "):
        train(TrainConfig(shards=["nowhere"], out=str(tmp_path), crop="zoom"))


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def cli():
    from pairmill.cli import cmd_sample, cmd_train

    app = typer.Typer()
    cmd_train.register(app)
    cmd_sample.register(app)
    return app


def test_train_and_sample_cli(cli, run_dir, sample_crawl, tmp_path):
    runner = CliRunner()
    out = tmp_path / "ckpts"
    args = ["train", str(run_dir), "--out", str(out), "--image-size", "16", "--batch-size", "4"]
    args += ["--steps", "2", "--ckpt-every", "1", "--log-every", "1", "--device", "cpu"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "img/s" in result.output and "trained to step 2" in result.output
    assert {p.name for p in out.glob("*.pt")} == {"ckpt-0000001.pt", "ckpt-0000002.pt", "latest.pt"}

    images = sorted((sample_crawl.parent / "files").glob("*.jpg"))[:2]
    assert len(images) == 2
    png = tmp_path / "grid.png"
    args = ["sample", str(out / "latest.pt"), "--png", str(png), "--n", "3", "--steps", "3"]
    args += ["--device", "cpu", "--seed", "1"]
    for image in images:
        args += ["--cond", str(image)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    with Image.open(png) as grid:
        assert grid.size == (4 * 16, 2 * 16)
        first = np.asarray(grid)
    assert runner.invoke(cli, args).exit_code == 0  # same seed, same grid
    with Image.open(png) as grid:
        assert np.array_equal(np.asarray(grid), first)


def test_sample_encodes_like_the_build(run_dir, tmp_path):
    """The checkpoint's encoder (tiny, random seed 0) reproduces the shards' embeddings."""
    from pairmill.data import read_pairs
    from pairmill.train.sample import encode_images

    row = next(read_pairs(run_dir, columns=["cond_image", "cond_embedding"]))
    path = tmp_path / "cond.img"
    path.write_bytes(row["cond_image"])
    info = {"name": "tiny", "weights": {"source": "random", "seed": 0}}
    emb = encode_images([path], info)
    assert emb.shape == (1, 128)
    assert np.allclose(emb[0], row["cond_embedding"], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Metrics


def test_fid_of_a_set_with_itself_is_zero(rng):
    a = rng.normal(size=(200, 8))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = metrics.frechet_distance(a, a + 1.0)
    assert shifted == pytest.approx(8.0, rel=1e-6)  # |mu difference|^2, covariances equal


def test_precision_recall_on_point_clouds(rng):
    real = rng.normal(size=(300, 2))
    assert metrics.precision_recall(real, real.copy()) == (1.0, 1.0)
    # Fakes collapsed onto a small part of the real cloud: precise, but poor recall.
    collapsed = rng.normal(scale=0.1, size=(300, 2))
    precision, recall = metrics.precision_recall(real, collapsed)
    assert precision > 0.95 and recall < 0.3
    # Fakes far away: neither.
    assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)


@pytest.mark.parametrize("dim", [2, 16, 128])
def test_faiss_and_numpy_agree(dim):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(dim)
    # An offset far from the origin: float32 cancellation is what faiss must not suffer.
    real = rng.normal(size=(300, dim)) + 5.0
    fake = rng.normal(scale=0.9, size=(250, dim)) + 5.1
    for points in (real, fake):
        by_faiss = metrics.knn_radii(points, backend="faiss")
        assert np.allclose(by_faiss, metrics.knn_radii(points, backend="numpy"), rtol=1e-9)
    for k in (1, 3, 5):
        numpy_pr = metrics.precision_recall(real, fake, k=k, backend="numpy")
        assert metrics.precision_recall(real, fake, k=k, backend="faiss") == numpy_pr
        assert 0 < numpy_pr[0] <= 1 and 0 <= numpy_pr[1] < 1
    with pytest.raises(ValueError, match="backend"):
        metrics.precision_recall(real, fake, backend="annoy")


def test_copy_rate_and_alignment(rng):
    cond = rng.normal(size=(50, 16))
    assert metrics.copy_rate(cond * 3.0, cond) == 1.0  # scaled copies are copies
    assert metrics.alignment(cond, cond) == pytest.approx(1.0)
    unrelated = rng.normal(size=(50, 16))
    assert metrics.copy_rate(unrelated, cond) == 0.0
    assert abs(metrics.alignment(unrelated, cond)) < 0.2
