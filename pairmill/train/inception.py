"""The FID Inception network, for FID in the feature space papers report.

FID is conventionally computed on the 2048-d pool3 features of the TensorFlow Inception
graph of 2015-12-05, ported to PyTorch as ``pt_inception-2015-12-05-6726825d.pth`` (the
file pytorch-fid and torchmetrics use). Its architecture is torchvision's Inception-v3
with 1008 classes and four differences in the pooling branches: the 3x3 average pools of
the A, C and first E blocks exclude the padding from their count, and the last E block
max-pools instead. Inputs are resized to 299x299 (bilinear) and scaled to [-1, 1].

Weights are never downloaded: `find_weights` looks for an explicit file, then
``$PAIRMILL_INCEPTION_WEIGHTS``, then torch's hub cache (``$TORCH_HOME/hub/checkpoints``,
where those tools leave the file). Without them, evaluation reports the encoder's feature
space only and says where to put the file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pairmill.errors import WeightsError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
ENV = "PAIRMILL_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
FEATURE_DIM = 2048


def _avg_pool_no_pad(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _with_pool(block_class: type, pool) -> type:
    """A torchvision Inception block whose pooling branch pools with `pool` instead."""

    class Block(block_class):
        def _forward(self, x):
            outputs = super()._forward(x)
            outputs[-1] = self.branch_pool(pool(x))  # the pooling branch comes last
            return outputs

    Block.__name__ = f"FID{block_class.__name__}"
    return Block


def build_fid_inception() -> nn.Module:
    """The FID Inception architecture with uninitialised (random) weights."""
    from torchvision.models import inception as tv

    model = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    block_a = _with_pool(tv.InceptionA, _avg_pool_no_pad)
    block_c = _with_pool(tv.InceptionC, _avg_pool_no_pad)
    model.Mixed_5b = block_a(192, pool_features=32)
    model.Mixed_5c = block_a(256, pool_features=64)
    model.Mixed_5d = block_a(288, pool_features=64)
    model.Mixed_6b = block_c(768, channels_7x7=128)
    model.Mixed_6c = block_c(768, channels_7x7=160)
    model.Mixed_6d = block_c(768, channels_7x7=160)
    model.Mixed_6e = block_c(768, channels_7x7=192)
    model.Mixed_7b = _with_pool(tv.InceptionE, _avg_pool_no_pad)(1280)
    model.Mixed_7c = _with_pool(tv.InceptionE, _max_pool)(2048)
    return model


def find_weights(path: str | os.PathLike | None = None) -> Path | None:
    """The FID Inception weights file: `path`, else $PAIRMILL_INCEPTION_WEIGHTS, else the
    torch hub cache; None when none exists.

    Raises:
      WeightsError: an explicitly named file does not exist.
    """
    explicit = path or os.environ.get(ENV)
    if explicit:
        found = Path(explicit).expanduser()
        if not found.is_file():
            raise WeightsError(f"Inception weights {found} not found")
        return found
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    return cached if cached.is_file() else None


class InceptionFeatures:
    """pool3 features of the FID Inception network.

    Args:
      weights: the weights file (see `find_weights`).
      device: a torch device.
      batch_size: images per forward pass.
    """

    def __init__(self, weights: str | os.PathLike, device: str = "cpu", batch_size: int = 32):
        path = Path(weights)
        if path.name == WEIGHTS_FILE:
            # torch hub names files by their sha256 prefix: check it before trusting them.
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if not digest.startswith(WEIGHTS_FILE.rsplit("-", 1)[1].split(".")[0]):
                raise WeightsError(f"{path} does not have the sha256 its name promises")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = build_fid_inception()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise WeightsError(f"{path} is not the FID Inception's state dict: {first}") from None
        self.model = model.eval().requires_grad_(False).to(device)
        self.device, self.batch_size, self.path = device, batch_size, path

    def _pool3(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        for layer in (
            m.Conv2d_1a_3x3, m.Conv2d_2a_3x3, m.Conv2d_2b_3x3, m.maxpool1,
            m.Conv2d_3b_1x1, m.Conv2d_4a_3x3, m.maxpool2,
            m.Mixed_5b, m.Mixed_5c, m.Mixed_5d, m.Mixed_6a, m.Mixed_6b, m.Mixed_6c,
            m.Mixed_6d, m.Mixed_6e, m.Mixed_7a, m.Mixed_7b, m.Mixed_7c, m.avgpool,
        ):  # fmt: skip
            x = layer(x)
        return x.flatten(1)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) RGB images -> float64 (N, 2048) pool3 features."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}"
            )
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size]))
            x = chunk.to(self.device).permute(0, 3, 1, 2).float() / 255.0
            x = F.interpolate(
                x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False
            )
            out.append(self._pool3(2.0 * x - 1.0).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))
