"""Tests of pairmill.encoders: offline, CPU only, with weights the tests make and save."""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pairmill.encoders import (
    DEFAULT_ENCODER,
    PRESETS,
    WeightsInfo,
    get_preset,
    load_encoder,
    preprocess,
    resolve_device,
    resolve_weights,
)
from pairmill.errors import ConfigError, WeightsError

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
skdata = pytest.importorskip("skimage.data")
safetensors_torch = pytest.importorskip("safetensors.torch")

SMALL_DINO = "dinov2-vits14"  # the smallest real architecture


def _rgb(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(array[..., :3])


@pytest.fixture(scope="module")
def real_images() -> list[Image.Image]:
    """Different real photos, square and not, colour and grey."""
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "chelsea", "coffee", "camera", "rocket", "immunohistochemistry"]
    images = [_rgb(getattr(skdata, n)()) for n in names]
    return images + [_rgb(a) for a in load_sample_images().images]


def _pixels(images: list[Image.Image], preset_name: str) -> np.ndarray:
    preset = get_preset(preset_name)
    return np.stack([preprocess(im, preset) for im in images])


def _embed_with(model: torch.nn.Module, preset_name: str, pixels: np.ndarray) -> np.ndarray:
    """Reference embeddings: `model` run on inputs normalised here, not by the package."""
    preset = get_preset(preset_name)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (preset.mean, preset.std))
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.inference_mode():
        out = model.eval()(x)
    return torch.nn.functional.normalize(out, dim=-1).numpy()


def _random_tiny(seed: int, **kwargs) -> torch.nn.Module:
    """A model of tiny's architecture, built without the package."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    args = {"embed_dim": 128, "depth": 4, "num_heads": 4, **kwargs}
    return VisionTransformer(img_size=64, patch_size=8, num_classes=0, **args)


@pytest.fixture(scope="module")
def dino_518(real_images, tmp_path_factory):
    """A random ViT-S/14 state dict at DINOv2's native 518 px (as hub and original
    checkpoints are), one image, and the embedding timm's own pretrained-file loader
    gives for it at 224 px: the reference for our 518 -> 224 resampling."""
    arch = get_preset(SMALL_DINO).arch
    torch.manual_seed(9)
    state = timm.create_model(arch, pretrained=False, num_classes=0).state_dict()
    path = tmp_path_factory.mktemp("dino") / "w.safetensors"
    safetensors_torch.save_file(state, str(path))
    reference = timm.create_model(
        arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=0,
        img_size=224,
    )  # fmt: skip
    pixels = _pixels(real_images[:1], SMALL_DINO)  # one image keeps ViT-S passes cheap
    return state, pixels, _embed_with(reference, SMALL_DINO, pixels)


# --- presets ----------------------------------------------------------------------------


def test_importing_encoders_does_not_import_torch():
    code = "import sys, pairmill.encoders as e; e.get_preset('tiny'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_preset_table():
    assert DEFAULT_ENCODER == "dinov2-vitb14"
    assert set(PRESETS) == {
        "dinov2-vits14", "dinov2-vitb14", "dinov2-vitl14",
        "clip-vitb32", "clip-vitb16", "clip-vitl14", "siglip-vitb16", "tiny",
    }  # fmt: skip
    for name, preset in PRESETS.items():
        assert get_preset(name) is preset and preset.name == name
        assert -1.0 <= preset.low < preset.high <= 1.0
        assert preset.resize_size >= preset.image_size
        if name != "tiny":
            assert preset.image_size == 224 and preset.interpolation == "bicubic"
            assert preset.hub_repo and preset.hub_files[0].endswith(".safetensors")
    # The paper's bands.
    for name in ("dinov2-vits14", "dinov2-vitb14", "dinov2-vitl14"):
        assert (PRESETS[name].low, PRESETS[name].high) == (0.3, 0.9)
        assert PRESETS[name].resize_size == 256
    for name in ("clip-vitb32", "clip-vitb16", "clip-vitl14", "siglip-vitb16"):
        assert (PRESETS[name].low, PRESETS[name].high) == (0.65, 0.9)
    dims = {"dinov2-vits14": 384, "dinov2-vitb14": 768, "clip-vitb32": 512, "siglip-vitb16": 768}
    assert {n: PRESETS[n].embed_dim for n in dims} == dims


def test_hub_ids_match_library_pretrained_configs():
    open_clip = pytest.importorskip("open_clip")
    for preset in PRESETS.values():
        if preset.family == "timm":
            cfg = timm.models.get_pretrained_cfg(f"{preset.arch}.{preset.pretrained_tag}")
            assert cfg.hf_hub_id == preset.hub_repo
            assert tuple(cfg.mean) == preset.mean and tuple(cfg.std) == preset.std
        elif preset.family == "open_clip":
            cfg = open_clip.get_pretrained_cfg(preset.arch, preset.pretrained_tag)
            assert cfg["hf_hub"].rstrip("/") == preset.hub_repo
            assert tuple(cfg["mean"]) == preset.mean and tuple(cfg["std"]) == preset.std


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        get_preset("dinov3-vitb16")
    assert "dinov3-vitb16" in str(err.value)
    assert all(name in str(err.value) for name in PRESETS)


# --- preprocess -------------------------------------------------------------------------


def test_preprocess_resizes_shorter_side_and_center_crops():
    image = _rgb(skdata.astronaut())  # 512 x 512
    crop = preprocess(image, get_preset("dinov2-vitb14"))
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    # 512 -> 256, then the central 224: offset (256 - 224) / 2 = 16 on both axes.
    resized = np.asarray(image.resize((256, 256), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(crop, resized[16:240, 16:240])

    rocket = _rgb(skdata.rocket())  # 640 x 427, landscape
    crop = preprocess(rocket, get_preset("clip-vitb32"))
    assert crop.shape == (224, 224, 3)
    resized = np.asarray(rocket.resize((335, 224), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(crop, resized[:, 56:280])


def test_preprocess_matches_torchvision(real_images):
    T = pytest.importorskip("torchvision.transforms")
    for name in ("dinov2-vitb14", "clip-vitb32"):
        preset = get_preset(name)
        reference = T.Compose(
            [
                T.Resize(preset.resize_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(preset.image_size),
            ]
        )
        for image in real_images:
            np.testing.assert_array_equal(preprocess(image, preset), np.asarray(reference(image)))


def test_preprocess_grey_input_and_squash_mode():
    grey = Image.fromarray(skdata.camera())  # mode "L"
    assert preprocess(grey, get_preset("tiny")).shape == (64, 64, 3)
    coffee = _rgb(skdata.coffee())  # 600 x 400: squash keeps the whole frame
    expected = np.asarray(coffee.resize((224, 224), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(preprocess(coffee, get_preset("siglip-vitb16")), expected)


# --- the tiny encoder -------------------------------------------------------------------


def test_tiny_is_deterministic_unit_norm_and_batch_invariant(real_images):
    pixels = _pixels(real_images, "tiny")
    first, second = load_encoder("tiny"), load_encoder("tiny")
    a, b = first.embed(pixels), second.embed(pixels)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (len(real_images), 128) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    for i in range(len(pixels)):
        np.testing.assert_allclose(first.embed(pixels[i : i + 1])[0], a[i], atol=1e-5)
    assert not np.allclose(a, load_encoder("tiny", seed=1).embed(pixels))
    assert first.weights == WeightsInfo("random", None, None, 0, False, "random (seed 0)")
    # Built independently from the same seed: the package adds nothing to the model.
    np.testing.assert_allclose(a, _embed_with(_random_tiny(0), "tiny", pixels), atol=1e-6)


def test_tiny_band_keeps_some_pairs_and_rejects_some_on_both_sides(real_images):
    enc = load_encoder("tiny")
    emb = enc.embed(_pixels(real_images, "tiny"))
    sims = [float(emb[i] @ emb[j]) for i, j in itertools.combinations(range(len(emb)), 2)]
    low, high = enc.preset.low, enc.preset.high
    assert any(s < low for s in sims)
    assert any(low <= s <= high for s in sims)
    assert any(s > high for s in sims)


def test_embed_checks_input_and_handles_empty_batch():
    enc = load_encoder("tiny")
    assert enc.embed(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, 128)
    with pytest.raises(ValueError):
        enc.embed(np.zeros((2, 224, 224, 3), np.uint8))
    with pytest.raises(ValueError):
        enc.embed(np.zeros((2, 64, 64, 3), np.float32))


def test_forward_matches_embed():
    enc = load_encoder("tiny")
    pixels = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    out = enc.forward(enc.to_input(pixels))
    assert out.dtype == torch.float32 and tuple(out.shape) == (4, 128)
    np.testing.assert_array_equal(out.numpy(), enc.embed(pixels))


# --- random weights of a real architecture ----------------------------------------------


def test_random_weights_of_a_real_arch(real_images):
    before = torch.get_rng_state()
    enc = load_encoder(SMALL_DINO, "random", seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # seeding did not leak out
    assert enc.weights.source == "random" and not enc.weights.semantic
    assert enc.weights.seed == 3 and enc.weights.sha256 is None
    assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())
    pixels = _pixels(real_images[:2], SMALL_DINO)
    emb = enc.embed(pixels)
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb, load_encoder(SMALL_DINO, "random", seed=3).embed(pixels))


@pytest.mark.slow
def test_every_preset_builds_with_random_weights():
    for name, preset in PRESETS.items():
        size = preset.image_size
        emb = load_encoder(name, "random").embed(np.zeros((2, size, size, 3), np.uint8))
        assert emb.shape == (2, preset.embed_dim), name


# --- weights from files -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pth-wrapped", "bin-ddp"])
def test_weights_saved_by_the_test_load_exactly(tmp_path, real_images, fmt):
    source = _random_tiny(seed=7)
    state = source.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        safetensors_torch.save_file(state, str(path))
    elif fmt == "pt":
        path = tmp_path / "w.pt"
        torch.save(state, path)
    elif fmt == "pth-wrapped":
        path = tmp_path / "w.pth"
        torch.save({"model": state, "epoch": 3}, path)
    else:
        path = tmp_path / "w.bin"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)

    enc = load_encoder("tiny", str(path))
    assert enc.weights.source == "file" and enc.weights.path == str(path)
    assert enc.weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    pixels = _pixels(real_images, "tiny")
    np.testing.assert_allclose(enc.embed(pixels), _embed_with(source, "tiny", pixels), atol=1e-6)


def test_original_dinov2_checkpoint_is_resampled_like_timm(tmp_path, dino_518):
    # facebookresearch/dinov2's *_pretrain.pth: the same keys plus a mask_token, at 518 px.
    state, pixels, expected = dino_518
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(dict(state, mask_token=torch.zeros(1, 384)), path)
    enc = load_encoder(SMALL_DINO, f"file://{path}")
    assert enc.weights.semantic
    np.testing.assert_allclose(enc.embed(pixels), expected, atol=1e-6)


def test_open_clip_file_matches_encode_image(tmp_path, real_images):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(11)
    source = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()
    path = tmp_path / "open_clip_model.safetensors"
    safetensors_torch.save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, str(path)
    )
    enc = load_encoder("clip-vitb32", str(path))
    pixels = _pixels(real_images[:2], "clip-vitb32")
    with torch.inference_mode():
        expected = source.encode_image(enc.to_input(pixels), normalize=True).numpy()
    np.testing.assert_allclose(enc.embed(pixels), expected, atol=1e-6)


class _WritesAFile:
    """Unpickling this creates `path`: a stand-in for code hidden in a checkpoint."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dumps"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"cls_token": _WritesAFile(str(marker))}}
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(WeightsError, match="refusing to load"):
        load_encoder("tiny", str(path))
    assert not marker.exists()


def test_mismatched_state_dict_names_keys_and_preset(tmp_path):
    state = dict(_random_tiny(seed=0).state_dict())
    state["blocks.9.attn.bogus"] = state.pop("norm.weight")
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        load_encoder("tiny", str(path))
    message = str(err.value)
    assert "missing keys: norm.weight" in message
    assert "unexpected keys: blocks.9.attn.bogus" in message
    assert "tiny" in message and "\n" not in message


def test_weights_of_another_width_are_a_shape_mismatch(tmp_path):
    path = tmp_path / "wider.safetensors"
    safetensors_torch.save_file(_random_tiny(seed=0, embed_dim=192).state_dict(), str(path))
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_encoder("tiny", str(path))


def test_weights_file_changed_after_resolving(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(_random_tiny(seed=0).state_dict(), path)
    info = resolve_weights(get_preset("tiny"), str(path))
    torch.save(_random_tiny(seed=1).state_dict(), path)
    os.utime(path, ns=(1, 1))  # a new mtime even on a coarse filesystem clock
    with pytest.raises(WeightsError, match="changed"):
        load_encoder("tiny", info)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ("/nonexistent/w.safetensors", "does not exist"),
        ("https://example.com/w.safetensors", "local path"),
        ("", "empty"),
    ],
)
def test_bad_weights_locations(weights, match):
    with pytest.raises(WeightsError, match=match):
        resolve_weights(get_preset(SMALL_DINO), weights)


def test_unsupported_weights_suffix(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(b"x")
    with pytest.raises(WeightsError, match="unsupported"):
        resolve_weights(get_preset(SMALL_DINO), str(path))


# --- the Hugging Face cache ------------------------------------------------------------


def _fake_hub_cache(root, repo_id: str, filename: str, state: dict) -> str:
    """huggingface_hub's layout: blobs/<sha256>, snapshots/<rev>/<file> -> blob, refs/main."""
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    for sub in ("blobs", f"snapshots/{revision}", "refs"):
        (repo_dir / sub).mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    blob = repo_dir / "blobs" / "incoming"
    safetensors_torch.save_file(state, str(blob))
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    blob = blob.rename(repo_dir / "blobs" / digest)
    (repo_dir / "snapshots" / revision / filename).symlink_to(blob)
    return digest


def test_weights_found_in_hugging_face_cache(tmp_path, monkeypatch, dino_518):
    state, pixels, expected = dino_518
    preset = get_preset(SMALL_DINO)
    cache = tmp_path / "cache"
    digest = _fake_hub_cache(cache, preset.hub_repo, "model.safetensors", state)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    info = resolve_weights(preset, None)
    assert info.source == "hub" and info.semantic and info.sha256 == digest
    assert preset.hub_repo in info.description
    np.testing.assert_allclose(load_encoder(preset, info).embed(pixels), expected, atol=1e-6)

    # HF_HOME is honoured too, as <HF_HOME>/hub.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "hub").symlink_to(cache)
    assert resolve_weights(preset, None).sha256 == digest


def test_offline_without_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        resolve_weights(get_preset("dinov2-vitb14"), None)
    message = str(err.value)
    assert "\n" not in message
    assert "--weights PATH" in message and "--weights random" in message
    assert "timm/vit_base_patch14_dinov2.lvd142m" in message and str(tmp_path) in message


def test_tiny_resolves_to_random_without_the_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    info = resolve_weights(get_preset("tiny"), None, seed=4)
    assert (info.source, info.seed, info.semantic) == ("random", 4, False)


# --- devices ----------------------------------------------------------------------------


def test_resolve_device_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="unknown"):
        resolve_device("tpu")


@pytest.mark.gpu
def test_cuda_embed_agrees_with_cpu(real_images):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pixels = _pixels(real_images, SMALL_DINO)
    cpu = load_encoder(SMALL_DINO, "random").embed(pixels)
    gpu_encoder = load_encoder(SMALL_DINO, "random", device="auto")
    assert gpu_encoder.device == "cuda"
    gpu = gpu_encoder.embed(pixels)  # bf16 autocast: close to the CPU result, not equal
    assert gpu.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(gpu, axis=1), 1.0, atol=1e-5)
    assert float(np.min(np.sum(cpu * gpu, axis=1))) > 0.99
