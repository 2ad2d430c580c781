"""Cross-attention to patch tokens: the model, training on pair_v2 shards, sampling, eval."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import assert_same_checkpoints, small_config  # shared run settings

from pairmill.train import evaluate as ev
from pairmill.train.diffusion import Schedule, diffusion_loss, sample
from pairmill.train.loop import BatchStream, load_checkpoint, prepare_batch, train
from pairmill.train.model import build_model, model_config
from pipelines import build_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKEN_GRID = 4  # the tiny encoder's 8 x 8 patches pooled to 4 x 4: 16 tokens of width 128
ENCODER = {"name": "tiny", "weights": {"source": "random", "seed": 0}, "token_grid": TOKEN_GRID}


@pytest.fixture(scope="module")
def v1_run(sample_crawl, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    argv = [str(sample_crawl), "--out", str(out), "--encoder", "tiny", "--device", "cpu"]
    build_pairs.run([*argv, "--low", "-1", "--high", "0.99"])
    return out


@pytest.fixture(scope="module")
def v2_run(v1_run, tmp_path_factory):
    """The v1 run rewritten as pair_v2: both sides' tokens from the run's own encoder (as
    `build --store-tokens --token-grid 4` stores them), in several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import schemas
    from pairmill.data import read_pairs

    out = tmp_path_factory.mktemp("run_v2")
    rows = sorted(read_pairs(v1_run), key=lambda r: r["pair_id"])
    for side in ("cond", "target"):
        images = [r[f"{side}_image"] for r in rows]
        emb, tokens = ev.embed_bytes(images, ENCODER, None, "cpu", tokens=True)
        assert np.allclose(emb, np.stack([r[f"{side}_embedding"] for r in rows]), atol=1e-5)
        for row, tok in zip(rows, tokens, strict=True):
            row[f"{side}_tokens"] = np.ascontiguousarray(tok, "<f2").tobytes()
            row["token_count"], row["token_dim"] = tok.shape
    for row in rows:
        for name in ("cond_embedding", "target_embedding"):
            row[name] = row[name].tolist()
    (out / "pairs").mkdir()
    table = pa.Table.from_pylist(rows, schema=schemas.load("pair_v2").arrow())
    pq.write_table(table, out / "pairs" / "pairs-00000-of-00001.parquet", row_group_size=16)
    manifest = json.loads((v1_run / "manifest.json").read_text())
    manifest["encoder"]["token_grid"] = TOKEN_GRID
    manifest["tables"]["pairs"]["format"] = "parquet"
    manifest["tables"]["pairs"]["shards"] = [
        {"path": "pairs/pairs-00000-of-00001.parquet", "rows": len(rows)}
    ]
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(v1_run / "images", out / "images")  # eval reads a run's images table
    return out


def token_model(token_dim: int = 12, seed: int = 0, zero_cross: bool = False):
    """A tiny token model with random weights (optionally keeping cross-attention's zero
    output projections, as at init)."""
    torch.manual_seed(seed)
    model = build_model(model_config("tiny", 16, 8, token_dim))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not (zero_cross and "cross.proj" in name):
                p.normal_(std=0.05)
    return model.eval()


def quiet(_line):
    pass


# ---------------------------------------------------------------------------------------------
# Model


def test_token_model_shapes_and_null_tokens():
    model = token_model()
    z, t, cond = torch.randn(3, 3, 16, 16), torch.rand(3), torch.randn(3, 8)
    tokens = torch.randn(3, 9, 12).half()  # float16 as stored, a 3 x 3 grid
    v = model(z, t, cond, None, tokens)
    assert v.shape == (3, 3, 16, 16)
    # Kept rows depend on their tokens; dropped rows use the null embedding and null tokens,
    # so neither their embedding nor their tokens (nor the token count) matter.
    assert not torch.allclose(model(z, t, cond, None, tokens.roll(1, 0))[1], v[1])
    drop = torch.tensor([True, False, True])
    dropped = model(z, t, cond, drop, tokens)
    assert torch.allclose(dropped[1], v[1], atol=1e-6)
    other = model(z, t, torch.randn(3, 8), drop, torch.randn(3, 16, 12))
    assert torch.allclose(other[[0, 2]], dropped[[0, 2]], atol=1e-6)
    with torch.no_grad():
        model.null_tokens.add_(1.0)  # the null tokens are what dropped rows attend to
    changed = model(z, t, cond, drop, tokens)
    assert not torch.allclose(changed[0], dropped[0]) and torch.equal(changed[1], dropped[1])
    with pytest.raises(ValueError, match="expected tokens"):
        model(z, t, cond)
    with pytest.raises(ValueError, match="square grid"):
        model(z, t, cond, None, torch.randn(3, 8, 12))
    with pytest.raises(ValueError, match="no cross-attention"):
        build_model(model_config("tiny", 16, 8))(z, t, cond, None, tokens)


def test_zero_init_cross_attention_is_the_global_model():
    """At init the cross-attention adds exactly nothing: a token model computes what the
    global-only model with the same other weights computes, whatever the tokens."""
    model = token_model(zero_cross=True)
    glob = build_model(model_config("tiny", 16, 8))
    shared = {k: v for k, v in model.state_dict().items() if k in glob.state_dict()}
    glob.load_state_dict(shared)  # strict: every global weight is in the token model
    z, t, cond = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 8)
    expected = glob.eval()(z, t, cond)
    for tokens in (torch.randn(2, 4, 12), 10 * torch.randn(2, 16, 12)):
        assert torch.equal(model(z, t, cond, None, tokens), expected)
    fresh = build_model(model_config("tiny", 16, 8, 12))
    assert all(torch.count_nonzero(b.cross.proj.weight) == 0 for b in fresh.blocks)
    # Checkpoints from before tokens (no token_dim in their model config) still build.
    legacy = {k: v for k, v in model_config("tiny", 16, 8).to_dict().items() if k != "token_dim"}
    assert build_model(legacy).config.token_dim == 0


def test_loss_falls_with_tokens_and_the_model_uses_them():
    torch.manual_seed(0)
    model = build_model(model_config("tiny", 16, 8, 12)).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 16, 16, generator=gen) * 2 - 1
    cond, tokens = torch.randn(8, 8, generator=gen), torch.randn(8, 16, 12, generator=gen)
    t, eps = torch.rand(8, generator=gen), torch.randn(8, 3, 16, 16, generator=gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.99))
    losses = []
    for _ in range(40):
        loss = diffusion_loss(model, Schedule(16), x, cond, t, eps, None, tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert all(torch.count_nonzero(b.cross.proj.weight) > 0 for b in model.blocks)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guided_sampling_with_tokens_is_seeded(sampler):
    model, cond, tokens = token_model(), torch.randn(2, 8), torch.randn(2, 4, 12)

    def draw(seed, guidance=0.5, toks=tokens):
        gen = torch.Generator().manual_seed(seed)
        return sample(model, Schedule(16), cond, 3, sampler, guidance, gen, tokens=toks)

    first = draw(7)
    assert first.shape == (2, 3, 16, 16)
    assert torch.equal(first, draw(7)) and not torch.equal(first, draw(8))
    assert not torch.equal(first, draw(7, toks=tokens.flip(0)))


# ---------------------------------------------------------------------------------------------
# Training on pair_v2 shards


def test_prepare_batch_flips_tokens_with_the_sides():
    n = 64
    batch = {
        "cond_image": torch.zeros(n, 3, 4, 4, dtype=torch.uint8),
        "target_image": torch.full((n, 3, 4, 4), 255, dtype=torch.uint8),
        "cond_embedding": torch.zeros(n, 2),
        "target_embedding": torch.ones(n, 2),
        "cond_tokens": torch.zeros(n, 4, 3, dtype=torch.float16),
        "target_tokens": torch.ones(n, 4, 3, dtype=torch.float16),
    }
    x, cond, tokens = prepare_batch(batch, "pairs", torch.Generator().manual_seed(0))
    flipped = x[:, 0, 0, 0] == -1
    assert 0 < int(flipped.sum()) < n
    assert torch.all(tokens[flipped] == 1) and torch.all(tokens[~flipped] == 0)
    assert torch.equal(cond[:, 0], tokens[:, 0, 0].float())  # always the same side
    _, _, tokens = prepare_batch(batch, "reconstruct", torch.Generator().manual_seed(0))
    assert torch.all(tokens == 0)


def test_batch_stream_reads_tokens(v2_run):
    stream = BatchStream([str(v2_run)], 4, 8, 8, seed=1, tokens=True, crop="random")
    batch = next(stream.batches(0))
    assert batch["cond_tokens"].shape == (4, TOKEN_GRID**2, 128)
    assert batch["cond_tokens"].dtype == torch.float16
    assert "cond_tokens" not in next(BatchStream([str(v2_run)], 4, 8, 8, seed=1).batches(0))


def test_v2_shards_train_a_token_model_and_no_tokens_does_not(v2_run, v1_run, tmp_path):
    train(small_config(v2_run, tmp_path / "tok", steps=1), echo=quiet)
    ckpt = load_checkpoint(tmp_path / "tok" / "latest.pt")
    assert ckpt["model_config"]["token_dim"] == 128
    assert ckpt["config"]["tokens"] is True and ckpt["config"]["crop"] == "random"
    assert ckpt["encoder"]["token_grid"] == TOKEN_GRID
    assert ckpt["encoder"]["token_count"] == TOKEN_GRID**2
    assert any("cross.proj" in name for name in ckpt["model"])

    train(small_config(v2_run, tmp_path / "glob", steps=1, tokens=False), echo=quiet)
    assert load_checkpoint(tmp_path / "glob" / "latest.pt")["model_config"]["token_dim"] == 0
    train(small_config(v1_run, tmp_path / "v1", steps=1), echo=quiet)  # v1: global only
    assert load_checkpoint(tmp_path / "v1" / "latest.pt")["model_config"]["token_dim"] == 0

    from pairmill.errors import ConfigError

    with pytest.raises(ConfigError, match="another model"):  # tokens on, then off: refused
        train(small_config(v2_run, tmp_path / "tok", steps=2, tokens=False), echo=quiet)


def test_token_resume_with_random_crops_is_bit_identical(v2_run, tmp_path):
    config = {"crop_scale": 0.6, "cond_drop": 0.5}
    train(small_config(v2_run, tmp_path / "a", **config), echo=quiet)
    train(small_config(v2_run, tmp_path / "b", steps=2, **config), echo=quiet)
    lines = []
    train(small_config(v2_run, tmp_path / "b", **config), echo=lines.append)
    assert lines[0].startswith("resuming from") and "step 2" in lines[0]
    assert "cross-attention to 16 tokens" in lines[1]
    assert_same_checkpoints(tmp_path / "a" / "latest.pt", tmp_path / "b" / "latest.pt", step=3)


# ---------------------------------------------------------------------------------------------
# Sampling and evaluation from a token checkpoint


@pytest.fixture(scope="module")
def token_ckpt(v2_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok_ckpt")
    torch.set_num_threads(1)
    train(small_config(v2_run, out, steps=2), echo=quiet)
    return out / "latest.pt"


def test_sample_grid_from_a_token_checkpoint_is_seeded(token_ckpt, sample_crawl, tmp_path):
    from pairmill.errors import ConfigError
    from pairmill.train.sample import generate, load_denoiser, sample_grid

    images = sorted((sample_crawl.parent / "files").glob("*.jpg"))[:2]
    pngs = [tmp_path / f"{i}.png" for i in range(3)]
    for png, seed in zip(pngs, (1, 1, 2), strict=True):
        assert sample_grid(token_ckpt, images, png, n=2, steps=2, seed=seed) == (48, 32)
    arrays = [np.asarray(Image.open(p)) for p in pngs]
    assert np.array_equal(arrays[0], arrays[1]) and not np.array_equal(arrays[0], arrays[2])
    model = load_denoiser(load_checkpoint(token_ckpt))
    with pytest.raises(ConfigError, match="needs patch tokens"):
        generate(model, np.zeros((1, 128)), n=1, steps=1)


def test_eval_of_a_token_checkpoint(token_ckpt, v2_run, monkeypatch):
    from pairmill.train import sample as sample_module

    calls = []
    encode = sample_module.encode_images_with_tokens

    def spy(paths, info, *args, **kwargs):
        calls.append(info["token_grid"])
        return encode(paths, info, *args, **kwargs)

    monkeypatch.setattr(sample_module, "encode_images_with_tokens", spy)
    config = ev.EvalConfig(steps=2, n_test=12, seed=1)
    first = ev.evaluate(token_ckpt, v2_run, config)
    assert calls == [TOKEN_GRID]  # the conditioning images, encoded with the run's grid
    assert first.rows[0]["n"] == 12 and 0 <= first.rows[0]["recall"] <= 1
    assert ev.evaluate(token_ckpt, v2_run, config).rows == first.rows


def test_train_cli_no_tokens_and_crop_flags(v2_run, tmp_path):
    import typer
    from typer.testing import CliRunner

    from pairmill.cli import cmd_train

    app = typer.Typer()
    cmd_train.register(app)
    app.command(name="noop")(lambda: None)  # keeps `train` a sub-command
    args = ["train", str(v2_run), "--out", str(tmp_path), "--image-size", "16"]
    args += ["--batch-size", "2", "--steps", "1", "--device", "cpu", "--no-tokens"]
    args += ["--crop", "random", "--crop-scale", "0.8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(tmp_path / "latest.pt")
    assert ckpt["model_config"]["token_dim"] == 0 and ckpt["config"]["tokens"] is False
    assert ckpt["config"]["crop_scale"] == 0.8


@pytest.mark.gpu
def test_cuda_training_with_tokens_resumes_and_samples(v2_run, tmp_path):
    """The CUDA path: bf16 autocast, channels-last, optimizer state moved on resume."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from pairmill.train.sample import load_denoiser

    summary = train(small_config(v2_run, tmp_path, steps=20, device="cuda"), echo=quiet)
    assert np.isfinite(summary["loss"])
    summary = train(small_config(v2_run, tmp_path, steps=25, device="cuda"), echo=quiet)
    assert summary["step"] == 25 and np.isfinite(summary["loss"])
    ckpt = load_checkpoint(tmp_path / "latest.pt")
    model = load_denoiser(ckpt, True, "cuda")
    assert next(model.parameters()).device.type == "cuda"
