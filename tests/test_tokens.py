"""`build --store-tokens`: patch tokens from the encoder, through the pipeline, into v2 shards
and back out of every reader."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from pairmill.config import BuildConfig
from pairmill.data import read_pairs, tokens_array
from pairmill.encoders import PRESETS, get_preset, load_encoder
from pairmill.encoders.preprocess import preprocess
from pairmill.encoders.tokens import pool_tokens
from pairmill.errors import ConfigError, InputError
from pairmill.validate import validate_run
from pipelines import build_pairs, refilter_pairs


def crops(photos, preset, n=3):
    from PIL import Image

    return np.stack([preprocess(Image.fromarray(p), preset) for _, p in photos[:n]])


# --- the encoder ------------------------------------------------------------------------------


def test_tokens_come_with_the_same_embedding(photos, one_torch_thread):
    encoder = load_encoder("tiny", "random")
    pixels = crops(photos, encoder.preset)
    plain = encoder.embed(pixels)
    embedding, tokens = encoder.embed_with_tokens(pixels)
    np.testing.assert_array_equal(embedding, plain)
    grid = encoder.preset.token_grid
    assert tokens.shape == (3, grid * grid, 128) and tokens.dtype == np.float16
    # Different photos give different tokens; tokens are not all one value.
    assert np.abs(tokens[0].astype(np.float32) - tokens[1]).max() > 0.1


def test_pooled_tokens_are_block_means(photos, one_torch_thread):
    import torch

    encoder = load_encoder("tiny", "random")
    pixels = crops(photos, encoder.preset, 2)
    native = encoder.forward_with_tokens(encoder.to_input(pixels))[1]
    side = encoder.preset.token_grid  # 8
    pooled = pool_tokens(native, 2)
    blocks = native.reshape(2, 2, side // 2, 2, side // 2, -1).mean(dim=(2, 4))
    torch.testing.assert_close(pooled, blocks.reshape(2, 4, -1))
    _, via_embed = encoder.embed_with_tokens(pixels, 2)
    np.testing.assert_array_equal(via_embed, pooled.half().numpy())
    with pytest.raises(ValueError, match="finer"):
        pool_tokens(native, side + 1)


def test_empty_batch_has_token_shapes():
    encoder = load_encoder("tiny", "random")
    s = encoder.preset.image_size
    embedding, tokens = encoder.embed_with_tokens(np.zeros((0, s, s, 3), np.uint8), 4)
    assert embedding.shape == (0, 128) and tokens.shape == (0, 16, 128)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in PRESETS if n != "tiny"])
def test_every_preset_gives_its_token_grid(name):
    """Each family's token path (timm, open_clip ViT, open_clip timm tower) agrees with
    the plain forward and with the preset's patch grid."""
    encoder = load_encoder(name, "random")
    s = encoder.preset.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (2, s, s, 3), dtype=np.uint8)
    embedding, tokens = encoder.embed_with_tokens(pixels)
    np.testing.assert_allclose(embedding, encoder.embed(pixels), atol=1e-6)
    assert tokens.shape[1] == encoder.preset.token_grid**2


# --- configuration ----------------------------------------------------------------------------


def test_token_grid_flags_are_checked():
    config = BuildConfig(inputs=["x"], out="o", encoder="tiny", store_tokens=True, token_grid=4)
    assert config.validate().schema_ids()["pairs"] == "pair_v2"
    assert BuildConfig(inputs=["x"], out="o", encoder="tiny").validate().schema_ids() == {
        "pairs": "pair_v1",
        "images": "image_v1",
        "similarities": "similarity_v1",
        "rejects": "reject_v1",
    }
    with pytest.raises(ConfigError, match="applies to --store-tokens"):
        BuildConfig(inputs=["x"], out="o", encoder="tiny", token_grid=4).validate()
    with pytest.raises(ConfigError, match="finer than tiny's 8x8"):
        BuildConfig(
            inputs=["x"], out="o", encoder="tiny", store_tokens=True, token_grid=9
        ).validate()
    assert get_preset("dinov2-vitb14").token_grid == 16
    assert get_preset("clip-vitb32").token_grid == 7


def test_v2_schemas_extend_v1_unchanged():
    for table in ("pair", "image"):
        v1, v2 = schemas.load(f"{table}_v1"), schemas.load(f"{table}_v2")
        assert v2.fields[: len(v1.fields)] == v1.fields
        assert {"token_count", "token_dim"} <= set(v2.names)
    assert [s.id for s in schemas.versions("pair")] == ["pair_v1", "pair_v2"]
    assert schemas.matching("pair", schemas.load("pair_v2").names).id == "pair_v2"
    assert schemas.matching("pair", ["pair_id"]) is None


# --- the pipeline -----------------------------------------------------------------------------


def build(crawl, out, *extra):
    argv = [str(crawl), "--out", str(out), "--encoder", "tiny", "--device", "cpu"]
    return build_pairs.run([*argv, "--low", "-1", "--high", "1", *extra]).pairmill_manifest


@pytest.fixture(scope="module")
def token_runs(sample_crawl, tmp_path_factory):
    base = tmp_path_factory.mktemp("tokens")
    build(sample_crawl, base / "plain")
    build(sample_crawl, base / "tokens", "--store-tokens", "--format", "tfrecord")
    build(sample_crawl, base / "pooled", "--store-tokens", "--token-grid", "2")
    return base


def test_store_tokens_writes_v2_with_the_same_pairs(token_runs):
    manifest = json.loads((token_runs / "tokens" / "manifest.json").read_text())
    assert manifest["tables"]["pairs"]["schema"] == "pair_v2"
    assert manifest["tables"]["images"]["schema"] == "image_v2"
    assert manifest["encoder"]["token_grid"] == 8
    plain = {r["pair_id"]: r for r in read_pairs(token_runs / "plain")}
    with_tokens = {r["pair_id"]: r for r in read_pairs(token_runs / "tokens")}
    assert plain and plain.keys() == with_tokens.keys()
    for pair_id, row in with_tokens.items():
        assert row["token_count"] == 64 and row["token_dim"] == 128
        assert row["cond_tokens"].shape == (64, 128) and row["cond_tokens"].dtype == np.float16
        for name, value in plain[pair_id].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, row[name])
            else:
                assert value == row[name], name
    for run in ("tokens", "pooled", "plain"):
        assert validate_run(str(token_runs / run))["ok"], run


def test_stored_tokens_are_the_encoders_tokens_of_each_image(token_runs, one_torch_thread):
    from functools import partial

    from pairmill.images import DecodeConfig, decode_image

    images = pq.read_table(token_runs / "tokens" / "images").to_pylist()
    by_id = {(r["episode_id"], r["image_id"]): r for r in images}
    encoder = load_encoder("tiny", "random")
    rows = images[:4]
    # The encoder input exactly as the pipeline makes it (same decoder, same preprocess).
    prepare = partial(preprocess, preset=encoder.preset)
    config, side = DecodeConfig(), encoder.preset.resize_size
    pixels = np.stack(
        [decode_image(r["image"], config, prepare, prepare_min_side=side).pixels for r in rows]
    )
    embedding, want = encoder.embed_with_tokens(pixels)
    for row, vector, expected in zip(rows, embedding, want, strict=True):
        np.testing.assert_allclose(row["embedding"], vector, atol=1e-5)
        got = tokens_array(row["tokens"], row["token_count"], row["token_dim"])
        np.testing.assert_allclose(got.astype(np.float32), expected, atol=2e-3, rtol=2e-3)
    # Each pair side carries its image's tokens, byte for byte.
    for pair in read_pairs(token_runs / "tokens"):
        for side in ("cond", "target"):
            image = by_id[(pair["episode_id"], pair[f"{side}_image_id"])]
            assert pair[f"{side}_tokens"].tobytes() == image["tokens"]


def test_pooled_tokens_in_shards(token_runs):
    manifest = json.loads((token_runs / "pooled" / "manifest.json").read_text())
    assert manifest["encoder"]["token_grid"] == 2
    row = next(read_pairs(token_runs / "pooled", columns=["target_tokens"]))
    assert list(row) == ["target_tokens"] and row["target_tokens"].shape == (4, 128)


def test_refilter_keeps_the_tokens(token_runs, tmp_path):
    refilter_pairs.run(
        ["--from-run", str(token_runs / "tokens"), "--out", str(tmp_path), "--low", "0"]
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["tables"]["pairs"]["schema"] == "pair_v2"
    source = {r["pair_id"]: r for r in read_pairs(token_runs / "tokens")}
    rows = list(read_pairs(tmp_path))
    assert rows and all(r["similarity"] >= 0 for r in rows)
    for row in rows:
        np.testing.assert_array_equal(row["cond_tokens"], source[row["pair_id"]]["cond_tokens"])
    assert validate_run(str(tmp_path))["ok"]


# --- readers and validation on damaged or mismatched shards -----------------------------------


def test_reading_tokens_from_a_v1_run_says_so(token_runs):
    with pytest.raises(InputError, match="no column 'cond_tokens'"):
        next(read_pairs(token_runs / "plain", columns=["cond_tokens"]))


def test_token_bytes_of_the_wrong_length_are_refused():
    with pytest.raises(InputError, match="not 4 x 8 float16"):
        tokens_array(b"\0" * 10, 4, 8, "shard")
    assert tokens_array(b"\0" * 64, 4, 8).flags.writeable


def test_validate_reports_damaged_tokens(token_runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(token_runs / "pooled", run)
    manifest = json.loads((run / "manifest.json").read_text())
    entry = manifest["tables"]["pairs"]["shards"][0]
    path = run / entry["path"]
    table = pq.read_table(path)
    tokens = table.column("cond_tokens").to_pylist()
    tokens[0] = tokens[0][:-2]  # one float16 short
    bad = np.frombuffer(tokens[1], "<f2").copy()
    bad[0] = np.inf
    tokens[1] = bad.tobytes()
    index = table.schema.get_field_index("cond_tokens")
    table = table.set_column(index, table.schema.field(index), pa.array(tokens, pa.binary()))
    pq.write_table(table, path)
    report = validate_run(str(run))
    text = "\n".join(problem["problem"] for problem in report["problems"])
    assert "cond_tokens hold 1022 bytes, not 4 x 128 float16" in text
    assert "cond_tokens are not finite" in text
