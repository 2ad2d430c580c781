"""Tests for pairmill.images: decoding, validation, conversion and re-encoding of crawled images.

Every input is built here from real photographs (scikit-image and scikit-learn sample data), so
the nasty cases (truncation, odd modes, bombs, foreign formats) look like what a crawl returns.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageCms, ImageOps
from skimage import data as skdata
from sklearn.datasets import load_sample_images

from pairmill import rejects
from pairmill.errors import ConfigError
from pairmill.images import SAFE_FORMATS, DecodeConfig, DecodedImage, decode_image

REPO = Path(__file__).resolve().parents[1]
# chelsea is 451x300: not square, so swapped axes or a wrong resize side show up.
CHELSEA_SIZE = (451, 300)


# ----------------------------------------------------------------------------- helpers


@functools.cache
def _photo_array(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        return load_sample_images().images[0 if name == "china" else 1]
    return getattr(skdata, name)()


def photo(name: str = "chelsea") -> Image.Image:
    """A fresh PIL copy of a sample photograph (RGB, or L for "camera")."""
    return Image.fromarray(_photo_array(name))


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg(im: Image.Image | None = None, **options) -> bytes:
    return encode(photo() if im is None else im, "JPEG", quality=95, **options)


def prepare32(im: Image.Image) -> np.ndarray:
    """Stand-in for the encoder's preprocessing: resize the short side, center-crop 32x32."""
    assert im.mode == "RGB"
    return np.asarray(ImageOps.fit(im, (32, 32), Image.Resampling.BICUBIC))


def identity(im: Image.Image) -> np.ndarray:
    """The RGB image handed to prepare, at full resolution, for pixel-level checks."""
    assert im.mode == "RGB"
    return np.asarray(im)


def decode_ok(data: bytes, config: DecodeConfig | None = None, **kwargs) -> DecodedImage:
    result = decode_image(data, config or DecodeConfig(), **kwargs)
    assert isinstance(result, DecodedImage), result
    return result


def full_pixels(data: bytes, config: DecodeConfig | None = None) -> np.ndarray:
    """The RGB pixels decode_image produces for `data`, at full resolution."""
    pixels = decode_ok(data, config, prepare=identity).pixels
    assert pixels is not None
    return pixels.astype(np.int16)


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def grey8() -> np.ndarray:
    return _photo_array("camera")  # 512x512 uint8 photograph


def as_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, followed by a tiny IDAT: a bomb's header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def with_alpha(rgb: np.ndarray, alpha: np.ndarray) -> Image.Image:
    return Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8))


def left_transparent_alpha(height: int, width: int) -> np.ndarray:
    alpha = np.full((height, width), 255, np.uint8)
    alpha[:, :100] = 0  # fully transparent: must become white
    alpha[:, 100:200] = 128  # half transparent: blended over white
    return alpha


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"resize": "stretch"}, "--resize"),
        ({"image_size": 0}, "--image-size"),
        ({"image_size": 256.0}, "--image-size"),
        ({"image_format": "gif"}, "--image-format"),
        ({"image_format": "jpeg"}, "--image-format"),
        ({"quality": 0}, "--quality"),
        ({"quality": 101}, "--quality"),
        ({"quality": True}, "--quality"),
        ({"min_side": -1}, "--min-side"),
        ({"max_aspect": 0.5}, "--max-aspect"),
        ({"max_aspect": float("nan")}, "--max-aspect"),
        ({"max_aspect": "3"}, "--max-aspect"),
        ({"max_pixels": 0}, "--max-pixels"),
    ],
)
def test_config_rejects_bad_values(kwargs, flag):
    with pytest.raises(ConfigError, match=flag) as info:
        DecodeConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_config_accepts_limits():
    DecodeConfig(min_side=0, max_aspect=float("inf"), quality=100, image_size=1)
    DecodeConfig(resize="border", image_format="webp", max_aspect=1)


# ----------------------------------------------------------------------------- rejections


def _eps() -> bytes:
    return encode(photo(), "EPS")


REJECTED = {
    "empty": (lambda: b"", rejects.EMPTY, "zero bytes"),
    "html_named_jpg": (
        lambda: b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>",
        rejects.DECODE_ERROR,
        "HTML",
    ),
    "svg": (
        lambda: b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
        rejects.DECODE_ERROR,
        "SVG",
    ),
    "random_noise": (
        lambda: np.random.default_rng(0).bytes(20_000),
        rejects.DECODE_ERROR,
        "not a recognised image",
    ),
    "truncated_jpeg": (lambda: jpeg()[: len(jpeg()) // 2], rejects.DECODE_ERROR, "truncated"),
    "truncated_progressive_jpeg": (
        lambda: jpeg(progressive=True)[:20_000],
        rejects.DECODE_ERROR,
        "truncated",
    ),
    "truncated_png": (
        lambda: encode(photo(), "PNG")[:50_000],
        rejects.DECODE_ERROR,
        "truncated",
    ),
    "broken_jpeg_header": (
        lambda: jpeg()[:3] + np.random.default_rng(1).bytes(2_000),
        rejects.DECODE_ERROR,
        "JPEG",
    ),
    "eps": (_eps, rejects.DECODE_ERROR, "EPS"),
    "pdf": (lambda: encode(photo(), "PDF"), rejects.DECODE_ERROR, "PDF"),
    "ico": (lambda: encode(photo().resize((64, 64)), "ICO"), rejects.DECODE_ERROR, "ICO"),
    "psd_magic": (lambda: b"8BPS" + bytes(40), rejects.DECODE_ERROR, "PSD"),
    "tiny": (lambda: jpeg(photo().resize((60, 40))), rejects.TOO_SMALL, "40 < 64"),
    "panorama_10_to_1": (
        lambda: jpeg(photo("china").resize((1000, 100))),
        rejects.BAD_ASPECT,
        "aspect 10.00 > 3",
    ),
    "bomb_header_over_pillow_hard_limit": (
        lambda: png_header_only(100_000, 100_000),
        rejects.TOO_LARGE,
        "pixels",
    ),
    "bomb_header_in_pillow_warning_zone": (
        lambda: png_header_only(10_000, 10_000),
        rejects.TOO_LARGE,
        "100000000 pixels",  # Pillow's message: its warning was turned into an error
    ),
    "bomb_header_just_over_max_pixels": (
        lambda: png_header_only(8192, 8193),
        rejects.TOO_LARGE,
        "8192x8193",
    ),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_rejects_bad_input(case):
    make, reason, detail = REJECTED[case]
    payload = make()
    # Warnings as errors: a Pillow DecompressionBombWarning must not escape even then.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        results = [
            decode_image(payload, DecodeConfig()),
            decode_image(payload, DecodeConfig(), prepare32, prepare_min_side=32),
        ]
    for result in results:
        assert result.reason == reason, result
        assert detail in result.detail
        assert result.detail
        assert "\n" not in result.detail
        assert len(result.detail) <= 200


def test_max_pixels_is_configurable():
    result = decode_image(jpeg(), DecodeConfig(max_pixels=100_000))
    assert result.reason == rejects.TOO_LARGE
    assert "451x300" in result.detail


def test_pillow_bomb_warning_is_silenced(tmp_path):
    # pytest resets warning filters after collecting, which drops the filter pairmill.images
    # installs on import; so check it in a fresh interpreter that shows every warning.
    code = (
        "import sys\n"
        "from pairmill.images import DecodeConfig, decode_image\n"
        "print(decode_image(sys.stdin.buffer.read(), DecodeConfig()).reason)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        input=png_header_only(10_000, 10_000),  # Pillow warns, does not raise, at this size
        capture_output=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    assert proc.stdout.decode().strip() == rejects.TOO_LARGE
    assert b"DecompressionBomb" not in proc.stderr


def test_eps_is_refused_without_running_ghostscript(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("an external program was started")

    monkeypatch.setattr(subprocess, "Popen", forbidden)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", forbidden)
    result = decode_image(_eps(), DecodeConfig(), prepare32, prepare_min_side=32)
    assert result.reason == rejects.DECODE_ERROR
    assert "EPS" in result.detail


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
def test_corrupted_bytes_never_raise(fmt):
    original = bytearray(encode(photo().resize((96, 64)), fmt))
    rng = np.random.default_rng(42)
    config = DecodeConfig(min_side=1, resize="center_crop", image_size=32)
    for _ in range(30):
        mutated = original.copy()
        for position in rng.integers(0, len(mutated), size=4):
            mutated[position] = int(rng.integers(0, 256))
        cut = int(rng.integers(len(mutated) // 2, len(mutated) + 1))
        result = decode_image(bytes(mutated[:cut]), config, prepare32, prepare_min_side=32)
        assert isinstance(result, (DecodedImage, rejects.Rejection))


# ----------------------------------------------------------------------------- conversions


def _cmyk_jpeg():
    # Pillow writes CMYK JPEGs Adobe-style (inverted, APP14 marker), as Photoshop does.
    return jpeg(photo().convert("CMYK")), np.asarray(photo()), 2.0


def _grey16(mode: str, fmt: str):
    wide = (grey8().astype(np.uint32) * 257).astype(">u2" if mode.endswith("B") else "<u2")
    im = Image.frombytes(mode, (512, 512), wide.tobytes())
    return encode(im, fmt), as_rgb(grey8()), 0.0


def _grey32(dtype):
    values = grey8().astype(dtype) * (257 if dtype == np.int32 else 1 / 255)
    return encode(Image.fromarray(values.astype(dtype)), "TIFF"), as_rgb(grey8()), 0.0


def _bilevel():
    im = Image.fromarray(grey8()).convert("1", dither=Image.Dither.NONE)
    expected = np.where(grey8() >= 128, 255, 0).astype(np.uint8)
    return encode(im, "PNG"), as_rgb(expected), 0.0


def _palette(transparent: bool):
    im = photo().quantize(colors=64)
    expected = np.array(im.convert("RGB"))
    options = {}
    if transparent:
        # A 65th palette entry (magenta, so a dropped transparency shows) marks the hole.
        im.putpalette([*im.getpalette()[: 64 * 3], 255, 0, 255])
        im.paste(64, (0, 0, 100, im.height))
        options["transparency"] = 64
        expected[:, :100] = 255
    return encode(im, "PNG", **options), expected, 0.0


def _rgba(fmt: str):
    rgb = np.asarray(photo()).astype(np.float64)
    alpha = left_transparent_alpha(*rgb.shape[:2])
    a = alpha[:, :, None] / 255
    expected = np.rint(rgb * a + 255 * (1 - a)).astype(np.uint8)
    options = {"lossless": True} if fmt == "WEBP" else {}
    return encode(with_alpha(rgb, alpha), fmt, **options), expected, 0.1


def _grey_alpha():
    alpha = left_transparent_alpha(512, 512)
    im = Image.fromarray(np.dstack([grey8(), alpha]), "LA")
    a = alpha / 255
    expected = np.rint(grey8() * a + 255 * (1 - a)).astype(np.uint8)
    return encode(im, "PNG"), as_rgb(expected), 0.1


CONVERSIONS = {
    "rgb_jpeg": lambda: (jpeg(), np.asarray(photo()), 3.0),
    "grey_jpeg": lambda: (jpeg(Image.fromarray(grey8())), as_rgb(grey8()), 2.0),
    "cmyk_jpeg_adobe_inverted": _cmyk_jpeg,
    "grey16_png": lambda: _grey16("I;16", "PNG"),
    "grey16_big_endian_tiff": lambda: _grey16("I;16B", "TIFF"),
    "int32_tiff": lambda: _grey32(np.int32),
    "float32_tiff": lambda: _grey32(np.float32),
    "bilevel_png": _bilevel,
    "palette_png": lambda: _palette(transparent=False),
    "palette_png_with_transparency": lambda: _palette(transparent=True),
    "rgba_png": lambda: _rgba("PNG"),
    "rgba_webp": lambda: _rgba("WEBP"),
    "grey_alpha_png": _grey_alpha,
}


@pytest.mark.parametrize("case", list(CONVERSIONS))
def test_converts_to_rgb(case):
    payload, expected, tolerance = CONVERSIONS[case]()
    pixels = full_pixels(payload)
    assert pixels.shape == expected.shape
    assert mean_abs_error(pixels, expected) <= tolerance


def test_grey16_is_scaled_not_clipped():
    payload, _, _ = _grey16("I;16", "PNG")
    pixels = full_pixels(payload)
    assert pixels.mean() == pytest.approx(grey8().mean(), abs=0.01)
    assert np.corrcoef(pixels[:, :, 0].ravel(), grey8().ravel())[0, 1] > 0.999


def test_transparent_regions_become_white():
    payload, _, _ = _rgba("PNG")
    pixels = full_pixels(payload)
    assert (pixels[:, :100] == 255).all()
    assert (pixels[:, 200:] == np.asarray(photo())[:, 200:]).all()


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("GIF", {"duration": 100, "loop": 0}),
        ("WEBP", {"duration": 100, "loop": 0, "lossless": True}),
        ("PNG", {"duration": 100, "loop": 0}),  # APNG
        ("MPO", {}),  # multi-picture JPEG, as stereo cameras write
    ],
)
def test_multi_frame_takes_first_frame(fmt, options):
    frames = [Image.new("RGB", (96, 96), colour) for colour in ("red", "blue", "lime")]
    payload = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **options)
    assert Image.open(io.BytesIO(payload)).n_frames == 3  # really multi-frame
    result = decode_ok(payload, prepare=identity)
    assert mean_abs_error(result.pixels, np.asarray(frames[0])) < 1.0
    assert result.format == ("jpeg" if fmt == "MPO" else fmt.lower())


# ----------------------------------------------------------------------------- orientation


def _camera_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "CameraMaker"
    return exif.tobytes()


def _oriented_jpeg(orientation: int) -> bytes:
    return jpeg(exif=_camera_exif(orientation))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_exif_transpose(orientation):
    payload = _oriented_jpeg(orientation)
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(payload))))
    result = decode_ok(payload, prepare=identity)
    assert result.pixels.shape == reference.shape
    assert (result.pixels == reference).all()
    assert (result.source_width, result.source_height) == reference.shape[1::-1]
    assert (result.width, result.height) == reference.shape[1::-1]


def test_orientation_6_rotates_clockwise_and_swaps_size():
    result = decode_ok(_oriented_jpeg(6), prepare=identity)
    assert (result.source_width, result.source_height) == (300, 451)
    expected = np.rot90(np.asarray(photo()), k=-1)  # 90 degrees clockwise
    assert mean_abs_error(result.pixels, expected) < 3


def test_reencoded_image_is_oriented_without_exif():
    result = decode_ok(_oriented_jpeg(6), DecodeConfig(resize="keep_ratio"))
    stored = Image.open(io.BytesIO(result.data))
    assert stored.size == (result.width, result.height) == (256, 385)
    assert not stored.getexif()


@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00" + b"\x13" * 64,  # garbage after the header
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x09",
        b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # IFD offset far outside the block
    ],
    ids=["garbage", "orientation_9", "bad_ifd_offset"],
)
def test_bad_exif_is_ignored(exif):
    payload = jpeg(exif=exif)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns "Corrupt EXIF data"; that is all
        result = decode_ok(payload, prepare=identity)
    assert (result.width, result.height) == CHELSEA_SIZE
    assert mean_abs_error(result.pixels, np.asarray(photo())) < 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warnings as errors: still no exception escapes
        strict = decode_image(payload, DecodeConfig(), identity)
    assert isinstance(strict, DecodedImage) or strict.reason == rejects.DECODE_ERROR


# ----------------------------------------------------------------------------- storage


@pytest.mark.parametrize(
    ("resize", "image_format", "size", "fmt"),
    [
        ("keep_ratio", None, (385, 256), "jpeg"),  # 451x300 -> short side 256
        ("center_crop", "webp", (256, 256), "webp"),
        ("border", "png", (256, 256), "png"),
        ("no", "png", CHELSEA_SIZE, "png"),
        ("no", "jpg", CHELSEA_SIZE, "jpeg"),
        ("keep_ratio", "webp", (385, 256), "webp"),
    ],
)
def test_resize_modes_size_format_and_determinism(resize, image_format, size, fmt):
    payload = jpeg()
    config = DecodeConfig(resize=resize, image_format=image_format, quality=90)
    first = decode_ok(payload, config, prepare=prepare32, prepare_min_side=32)
    second = decode_ok(payload, config, prepare=prepare32, prepare_min_side=32)
    assert first.data == second.data  # deterministic bytes
    stored = Image.open(io.BytesIO(first.data))
    assert stored.format.lower() == first.format == fmt
    assert stored.size == (first.width, first.height) == size
    assert (first.source_width, first.source_height) == CHELSEA_SIZE
    assert first.pixels.shape == (32, 32, 3)
    assert first.pixels.dtype == np.uint8


def test_center_crop_is_the_middle_of_keep_ratio():
    keep = decode_ok(jpeg(), DecodeConfig(resize="keep_ratio", image_format="png"))
    crop = decode_ok(jpeg(), DecodeConfig(resize="center_crop", image_format="png"))
    left = (keep.width - 256) // 2
    expected = np.asarray(Image.open(io.BytesIO(keep.data)))[:, left : left + 256]
    assert (np.asarray(Image.open(io.BytesIO(crop.data))) == expected).all()


def test_border_pads_with_black_around_the_centered_image():
    result = decode_ok(jpeg(), DecodeConfig(resize="border", image_format="png"))
    pixels = np.asarray(Image.open(io.BytesIO(result.data)))
    image_height = round(300 * 256 / 451)  # 170
    top = (256 - image_height) // 2
    assert (pixels[:top] == 0).all()
    assert (pixels[top + image_height :] == 0).all()
    assert pixels[top : top + image_height].mean() > 60  # the photo, not padding


def test_png_reencode_is_lossless():
    payload = encode(photo(), "PNG")
    result = decode_ok(payload, DecodeConfig(image_format="png"))
    assert (np.asarray(Image.open(io.BytesIO(result.data))) == np.asarray(photo())).all()


@pytest.mark.parametrize("image_format", ["jpg", "webp", "png"])
def test_reencode_strips_metadata(image_format):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    payload = jpeg(exif=_camera_exif(1), icc_profile=icc, comment=b"crawler note")
    result = decode_ok(payload, DecodeConfig(resize="keep_ratio", image_format=image_format))
    stored = Image.open(io.BytesIO(result.data))
    stored.load()
    assert not stored.getexif()
    assert not {"icc_profile", "comment", "exif"} & set(stored.info)


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("JPEG", {"quality": 90}),
        ("PNG", {}),
        ("WEBP", {}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {}),
        pytest.param(
            "AVIF",
            {},
            marks=pytest.mark.skipif(
                "AVIF" not in SAFE_FORMATS, reason="this Pillow cannot read AVIF"
            ),
        ),
    ],
)
def test_original_bytes_pass_through(fmt, options):
    payload = encode(photo(), fmt, **options)
    result = decode_ok(payload)
    assert result.data is payload
    assert result.format == fmt.lower()
    assert (result.width, result.height) == (result.source_width, result.source_height)
    assert (result.width, result.height) == CHELSEA_SIZE
    assert result.pixels is None
    with_pixels = decode_ok(payload, prepare=prepare32, prepare_min_side=32)
    assert with_pixels.data is payload
    assert with_pixels.pixels.shape == (32, 32, 3)


def test_prepare_contract_violation_raises():
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        decode_image(jpeg(), DecodeConfig(), lambda im: np.asarray(im, dtype=np.float32))


# ----------------------------------------------------------------------------- draft decoding


@functools.cache
def _large_jpeg(progressive: bool = False) -> bytes:
    big = photo("china").resize((1920, 1284), Image.Resampling.BICUBIC)
    return jpeg(big, progressive=progressive)


def _recording(prepare):
    seen = []

    def wrapped(im: Image.Image) -> np.ndarray:
        seen.append(im.size)
        return prepare(im)

    return wrapped, seen


@pytest.mark.parametrize("prepare_min_side", [32, 100, 300])
def test_draft_decoding_matches_full_decode(prepare_min_side):
    payload = _large_jpeg()
    draft_prepare, seen = _recording(prepare32)
    drafted = decode_ok(payload, prepare=draft_prepare, prepare_min_side=prepare_min_side)
    full = decode_ok(payload, prepare=prepare32)  # prepare_min_side=0: full resolution
    assert prepare_min_side <= min(seen[0]) < 1284  # reduced, but never below the need
    assert mean_abs_error(drafted.pixels, full.pixels) < 2.0
    assert (drafted.source_width, drafted.source_height) == (1920, 1284)


def test_draft_does_not_reduce_below_the_stored_size():
    payload = _large_jpeg()
    config = DecodeConfig(resize="center_crop", image_size=128, image_format="png")
    drafted = decode_ok(payload, config, prepare=prepare32, prepare_min_side=32)
    lossless = decode_ok(encode(Image.open(io.BytesIO(payload)), "BMP"), config)  # no draft
    assert (drafted.width, drafted.height) == (128, 128)
    stored = [np.asarray(Image.open(io.BytesIO(r.data))) for r in (drafted, lossless)]
    assert mean_abs_error(*stored) < 1.5


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncated_jpeg_rejected_in_draft_mode(progressive, keep):
    payload = _large_jpeg(progressive)
    draft_prepare, seen = _recording(prepare32)
    decode_ok(payload, prepare=draft_prepare, prepare_min_side=32)
    assert max(seen[0]) <= 1920 // 8 + 1  # the intact file really is decoded at 1/8 scale
    truncated = payload[: int(len(payload) * keep)]
    for result in (
        decode_image(truncated, DecodeConfig(), prepare32, prepare_min_side=32),
        decode_image(truncated, DecodeConfig()),  # validation only: the smallest draft
    ):
        assert result.reason == rejects.DECODE_ERROR
        assert "truncated" in result.detail
