"""The encoder as a Beam `ModelHandler`: batched, loaded once per process in `load_model`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

log = logging.getLogger("pairmill")


class ProgressLog:
    """Logs a running count and rate at most every `every` seconds."""

    def __init__(self, what: str, every: float = 5.0):
        self.what, self.every = what, every
        self.count, self.start, self.last = 0, None, 0.0

    def add(self, n: int) -> None:
        now = time.monotonic()
        if self.start is None:
            self.start = self.last = now
        self.count += n
        if now - self.last >= self.every:
            self.last = now
            rate = self.count / max(now - self.start, 1e-9)
            log.info("%s: %d images (%.1f images/s)", self.what, self.count, rate)


class EncoderModelHandler(ModelHandler[np.ndarray, Any, Any]):
    """Embeds uint8 HxWx3 encoder inputs into L2-normalised global embeddings.

    Wrap it in `KeyedModelHandler` so keys survive batching. Each prediction is the
    float32 embedding, or with `token_grid` a tuple (embedding, float16 (T, W) patch
    tokens pooled to token_grid x token_grid), from the same forward pass.

    Args:
      encoder: preset name.
      weights: a resolved `pairmill.encoders.WeightsInfo`.
      device: cpu or cuda (already resolved).
      batch_size: images per forward pass.
      seed: seed of random weights.
      token_grid: also return patch tokens on this grid (None: embeddings only).
    """

    def __init__(
        self,
        encoder: str,
        weights,
        device: str,
        batch_size: int,
        seed: int = 0,
        token_grid: int | None = None,
    ):
        # One copy per GPU shared by the worker's processes; one per process on CPU.
        super().__init__(
            min_batch_size=batch_size,
            max_batch_size=batch_size,
            large_model=(device == "cuda"),
        )
        self.encoder, self.weights, self.device = encoder, weights, device
        self.batch_size, self.seed, self.token_grid = batch_size, seed, token_grid
        self._progress: ProgressLog | None = None

    def load_model(self):
        from pairmill.encoders import load_encoder

        started = time.monotonic()
        model = load_encoder(self.encoder, self.weights, device=self.device, seed=self.seed)
        log.info(
            "loaded encoder %s (%s) on %s in %.1fs",
            self.encoder,
            self.weights.description,
            self.device,
            time.monotonic() - started,
        )
        return model

    def run_inference(
        self, batch: Sequence[np.ndarray], model, inference_args: dict[str, Any] | None = None
    ) -> list:
        pixels = np.stack(batch)
        if self.token_grid:
            embeddings, tokens = model.embed_with_tokens(pixels, self.token_grid)
            predictions = list(zip(embeddings, tokens, strict=True))
        else:
            predictions = list(model.embed(pixels))
        if self._progress is None:
            self._progress = ProgressLog("embedded")
        self._progress.add(len(batch))
        return predictions

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(item.nbytes for item in batch)

    def get_metrics_namespace(self) -> str:
        return "pairmill_encoder"
