"""The Encoder: uint8 crops in, L2-normalised float32 global embeddings out."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import numpy as np

from pairmill.encoders._deps import lazy
from pairmill.encoders.presets import EncoderPreset, get_preset
from pairmill.encoders.weights import WeightsInfo, file_sha256, resolve_weights
from pairmill.errors import ConfigError, WeightsError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str) -> str:
    """Map --device to a torch device: "auto" is "cuda" when a GPU is visible, else "cpu".

    Raises:
      ConfigError: for "cuda" without a visible GPU, or an unknown device.
    """
    if device == "cpu":
        return device
    if device == "auto" or device == "cuda" or device.startswith("cuda:"):
        torch = lazy("torch")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device == "auto":
            return "cuda" if count else "cpu"
        index = device.partition(":")[2]
        if not count:
            raise ConfigError(
                f"--device {device}: no CUDA GPU is visible; use --device cpu or auto"
            )
        if index and (not index.isdigit() or int(index) >= count):
            raise ConfigError(f"--device {device}: this machine has {count} CUDA GPU(s)")
        return device
    raise ConfigError(f"unknown --device {device!r}; use auto, cpu or cuda")


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns "No pretrained weights loaded" on every create_model without a tag,
    which is misleading here: we load the weights ourselves right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _build(preset: EncoderPreset, seed: int) -> torch.nn.Module:
    """The preset's architecture with seeded random init; RNG state restored afterwards."""
    torch = lazy("torch")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if preset.family == "tiny":
            from pairmill.encoders.tiny import build_tiny

            return build_tiny(preset)
        if preset.family == "timm":
            timm = lazy("timm")
            # CLS token after the final norm, at 224 px (not the 518 px DINOv2 trained at).
            return timm.create_model(
                preset.arch,
                pretrained=False,
                num_classes=0,
                global_pool="token",
                img_size=preset.image_size,
            )
        if preset.family == "open_clip":
            open_clip = lazy("open_clip")
            drop = _DropRandomInitWarning()
            logging.getLogger().addFilter(drop)
            try:
                # OpenAI's CLIP weights were trained with QuickGELU; open_clip only switches
                # it on by itself when it loads the tag, which we never let it do.
                return open_clip.create_model(
                    preset.arch,
                    pretrained=None,
                    force_quick_gelu=preset.pretrained_tag == "openai",
                    device="cpu",
                )
            finally:
                logging.getLogger().removeFilter(drop)
    raise ConfigError(f"preset {preset.name}: unknown family {preset.family!r}")


def _read_checked(preset: EncoderPreset, info: WeightsInfo) -> dict:
    """The state dict of `info`'s file, read before the model is built so bad files fail fast."""
    from pairmill.encoders.checkpoint import read_state_dict

    if info.path is None:
        raise WeightsError(f"{info.source} weights for {preset.name} have no path")
    # Workers load what the driver resolved: refuse a file that changed in between.
    if info.sha256 and file_sha256(info.path) != info.sha256:
        raise WeightsError(f"weights {info.path} changed since they were resolved (sha256 differs)")
    return read_state_dict(info.path)


def _load_state(model: torch.nn.Module, preset: EncoderPreset, state: dict, path: str) -> None:
    from pairmill.encoders import checkpoint

    if preset.family == "open_clip":
        state = checkpoint.adapt_open_clip(state, model)
    else:
        state = checkpoint.adapt_timm_vit(state, model)
    checkpoint.load_strict(model, state, preset, path)


class Encoder:
    """A frozen image encoder on one device.

    Args:
      preset: the encoder preset.
      weights: where the weights came from.
      device: "cpu" or "cuda[:N]", already resolved.
      model: the module mapping a normalised NCHW batch to (N, D) global features
        (for open_clip presets, the visual tower, i.e. what `encode_image` runs).
    """

    def __init__(
        self, preset: EncoderPreset, weights: WeightsInfo, device: str, model: torch.nn.Module
    ):
        torch = lazy("torch")
        self.preset = preset
        self.weights = weights
        self.device = device
        self._on_cuda = device.startswith("cuda")
        model.eval().requires_grad_(False)
        if self._on_cuda:
            model = model.to(device, memory_format=torch.channels_last)
        self.model = model
        # (x / 255 - mean) / std folded into one multiply-add on the device.
        std = torch.tensor(preset.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(preset.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = (1.0 / (255.0 * std)).to(device)
        self._shift = (-mean / std).to(device)

    @property
    def embed_dim(self) -> int:
        return self.preset.embed_dim

    def _check(self, pixels: np.ndarray) -> None:
        s = self.preset.image_size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(
                f"{self.preset.name} expects uint8 pixels of shape (N, {s}, {s}, 3), "
                f"got {pixels.dtype} {pixels.shape}"
            )

    def to_input(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (N, S, S, 3) -> normalised float32 NCHW tensor on the device."""
        torch = lazy("torch")
        self._check(pixels)
        if not pixels.flags.writeable:  # torch.from_numpy warns on read-only arrays
            pixels = pixels.copy()
        x = torch.from_numpy(np.ascontiguousarray(pixels))
        if self._on_cuda:
            # Ship uint8 (4x fewer bytes than float) from pinned memory, convert on the GPU.
            x = x.pin_memory().to(self.device, non_blocking=True)
        # NHWC viewed as NCHW is already channels_last in memory: keep it so on the GPU
        # (the patch-embed conv prefers it), make it plain contiguous on the CPU.
        layout = torch.channels_last if self._on_cuda else torch.contiguous_format
        x = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=layout)
        return x.mul_(self._scale).add_(self._shift)

    def _autocast(self):
        if self._on_cuda:
            torch = lazy("torch")
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input -> (N, D) float32 L2-normalised embeddings on the device."""
        torch = lazy("torch")
        with torch.inference_mode():
            with self._autocast():
                feats = self.model(x)
            return torch.nn.functional.normalize(feats.float(), dim=-1)

    def forward_with_tokens(
        self, x: torch.Tensor, grid: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised input -> ((N, D) unit embeddings, (N, T, W) patch tokens), on the device.

        The embeddings equal `forward`'s; the tokens are pooled to `grid` x `grid` when
        given (see `pairmill.encoders.tokens`).
        """
        torch = lazy("torch")
        from pairmill.encoders.tokens import global_and_tokens, pool_tokens

        with torch.inference_mode():
            with self._autocast():
                feats, tokens = global_and_tokens(self.model, x)
            return (
                torch.nn.functional.normalize(feats.float(), dim=-1),
                pool_tokens(tokens.float(), grid),
            )

    def embed_with_tokens(
        self, pixels: np.ndarray, grid: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, S, S, 3) crops -> (float32 (N, D) unit vectors, float16 (N, T, W) tokens).

        Args:
          pixels: crops from `preprocess`.
          grid: average-pool the patch tokens to grid x grid (None or 0: the native grid).
        """
        if len(pixels) == 0:
            self._check(pixels)
            empty = self.embed_with_tokens(np.zeros((1, *pixels.shape[1:]), np.uint8), grid)
            return empty[0][:0], empty[1][:0]
        feats, tokens = self.forward_with_tokens(self.to_input(pixels), grid)
        return feats.cpu().numpy(), tokens.to(lazy("torch").float16).cpu().numpy()

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) crops from `preprocess` -> float32 (N, D) unit vectors."""
        if len(pixels) == 0:
            self._check(pixels)
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return self.forward(self.to_input(pixels)).cpu().numpy()

    def __repr__(self) -> str:
        return f"Encoder({self.preset.name}, {self.weights.description}, {self.device})"


def load_encoder(
    preset_or_name: EncoderPreset | str,
    weights: WeightsInfo | str | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> Encoder:
    """Build the encoder, load its weights and move it to `device`.

    Args:
      preset_or_name: an EncoderPreset or a preset name.
      weights: a WeightsInfo from `resolve_weights`, or what `resolve_weights` accepts.
      device: "auto", "cpu" or "cuda".
      seed: init seed when the weights are random.
    """
    preset = get_preset(preset_or_name) if isinstance(preset_or_name, str) else preset_or_name
    info = weights if isinstance(weights, WeightsInfo) else resolve_weights(preset, weights, seed)
    device = resolve_device(device)
    state = None if info.source == "random" else _read_checked(preset, info)
    model = _build(preset, info.seed if info.seed is not None else seed)
    if state is not None:
        _load_state(model, preset, state, str(info.path))
    if preset.family == "open_clip":
        # encode_image(x) is visual(x) (+ optional normalize); keep only the image tower so
        # the text tower's weights do not sit in worker memory.
        model = model.visual
    return Encoder(preset, info, device, model)
