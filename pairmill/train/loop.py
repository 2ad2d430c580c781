"""The training loop: pair shards -> batches -> v-prediction updates, EMA, checkpoints.

Shards with patch tokens (pair_v2, from ``build --store-tokens``) train a cross-attention
model on them unless ``tokens`` is off; pair_v1 shards train on the global embedding only.

Resuming is exact: every random draw of step k (crop boxes, times, noise, side flips,
conditioning drops) comes from generators seeded with (seed, k), and the data stream is a
deterministic function of (seed, position): epoch e reads `PairShards` with
``set_epoch(e)`` (its unit order and shuffle buffer are seeded by (seed, e)), and step k
takes rows [k * batch_size, (k + 1) * batch_size) of the concatenated epochs. A resumed run
re-creates the stream and skips to row k * batch_size: whole epochs by arithmetic once the
epoch's row count is known (it is saved in the checkpoint after the first full epoch), the
rest by reading rows without decoding them. The global torch, numpy and python RNG states
are saved and restored as well, for anything outside the loop that draws from them.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pairmill.data import (
    EMBEDDING_FIELDS,
    IMAGE_FIELDS,
    TOKEN_FIELDS,
    PairShards,
    decode_pixels,
    read_pairs,
)
from pairmill.errors import ConfigError, InputError
from pairmill.train.diffusion import Schedule, diffusion_loss
from pairmill.train.model import MODELS, Denoiser, ModelConfig, build_model, model_config

log = logging.getLogger("pairmill")

CKPT_FORMAT = "pairmill-train-v1"
OBJECTIVES = ("pairs", "reconstruct")
CROPS = ("random", "center")
_COLUMNS = [*IMAGE_FIELDS, *EMBEDDING_FIELDS]


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in every checkpoint).

    Args:
      shards: pair shards (paths, run directories, globs or fsspec URLs).
      out: checkpoint directory; a ``latest.pt`` there is resumed.
      model: a size of `MODELS` (tiny, S, B).
      image_size: side of the (square-cropped) training images.
      batch_size, steps, lr: as usual; Adam betas are the paper's (0.9, 0.99).
      ema: EMA decay (warmed up as min(ema, (1 + step) / (10 + step))).
      cond_drop: probability of the null embedding (and null tokens) (classifier-free
        guidance training).
      objective: ``pairs`` (generate the other image of the pair, sides flipped at random)
        or ``reconstruct`` (rebuild the conditioning image itself: the baseline).
      device: auto, cpu or cuda.
      seed: seeds the model init, the data order and every step's draws.
      tokens: condition on the shards' patch tokens through cross-attention when they carry
        them (pair_v2); False trains global-only on any shards (the ablation).
      crop: ``random`` (a square box per image, drawn from the step's seed) or ``center``.
      crop_scale: random crops' side is drawn in [crop_scale, 1] x the shorter side; 1.0 (the
        default) keeps the whole shorter side, so only the position along the longer side
        varies: what the generator learns keeps the framing that sampling and evaluation
        show it (center crops of whole images), while every part of a non-square image is
        seen over the epochs. Lower it for zoom augmentation.
      decode_workers: threads decoding each batch's images (0: min(8, CPU count)); the next
        batch is prepared in the background during the current step. Not part of what a
        run depends on: any value gives the same batches.
      shuffle_buffer: rows in the data stream's shuffle buffer.
      log_every, ckpt_every: steps between progress lines / checkpoints.
    """

    shards: list[str] = field(default_factory=list)
    out: str = "runs/train"
    model: str = "tiny"
    image_size: int = 32
    batch_size: int = 32
    steps: int = 1000
    lr: float = 2e-4
    ema: float = 0.9999
    cond_drop: float = 0.1
    objective: str = "pairs"
    device: str = "auto"
    seed: int = 0
    shuffle_buffer: int = 1000
    log_every: int = 50
    ckpt_every: int = 1000
    betas: tuple[float, float] = (0.9, 0.99)
    tokens: bool = True
    crop: str = "random"
    crop_scale: float = 1.0
    decode_workers: int = 0

    def validate(self) -> None:
        """Raise ConfigError on a bad value, before anything is read or built."""
        if self.model not in MODELS:
            raise ConfigError(f"--model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be pairs or reconstruct, got {self.objective!r}")
        patch = MODELS[self.model]["patch"]
        if self.image_size < patch or self.image_size % patch:
            raise ConfigError(f"--image-size must be a multiple of {patch}, got {self.image_size}")
        for name in ("batch_size", "steps", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.cond_drop < 1:
            raise ConfigError(f"--cond-drop must be in [0, 1), got {self.cond_drop}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"--ema must be in [0, 1), got {self.ema}")
        if self.crop not in CROPS:
            raise ConfigError(f"--crop must be random or center, got {self.crop!r}")
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        if self.decode_workers < 0:
            raise ConfigError(f"--decode-workers must be >= 0, got {self.decode_workers}")
        if not self.shards:
            raise ConfigError("no pair shards given")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


# ---------------------------------------------------------------------------------------------
# Data


class BatchStream:
    """Deterministic batches of decoded pairs: batch k depends only on (seed, k).

    Args:
      shards: what `PairShards` accepts.
      batch_size: rows per batch.
      image_size: images are cropped to a square and resized to this side.
      shuffle_buffer: rows in the shuffle buffer (0: shard order).
      seed: seed of the unit order, the buffer shuffle and the crop boxes.
      epoch_rows: rows per epoch if known (from a checkpoint), to skip whole epochs cheaply.
      tokens: also read both sides' patch tokens (pair_v2 shards).
      crop: ``center``, or ``random`` (each image's box drawn from (seed, step), see
        `crop_draws`).
      crop_scale: random boxes' side is in [crop_scale, 1] x the image's shorter side.
      decode_workers: threads decoding a batch's images (Pillow releases the GIL while it
        decodes and resizes); 0: min(8, CPU count). The next batch is read and decoded in
        the background while the model trains on the current one. Batches do not depend
        on it.
    """

    def __init__(
        self,
        shards: Sequence[str],
        batch_size: int,
        image_size: int,
        shuffle_buffer: int,
        seed: int,
        epoch_rows: int | None = None,
        tokens: bool = False,
        crop: str = "center",
        crop_scale: float = 1.0,
        decode_workers: int = 0,
    ):
        columns = [*_COLUMNS, *TOKEN_FIELDS] if tokens else _COLUMNS
        # decode=False: skipped rows on resume are never decoded; kept rows are decoded here.
        self.dataset = PairShards(
            list(shards), shuffle_buffer=shuffle_buffer, seed=seed, decode=False, columns=columns
        )
        self.batch_size = batch_size
        self.image_size = image_size
        self.epoch_rows = epoch_rows
        self.tokens = tokens
        self.seed, self.crop, self.crop_scale = seed, crop, crop_scale
        self.decode_workers = decode_workers or min(8, os.cpu_count() or 1)

    def batches(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches start_step, start_step + 1, ... (forever), each made one step ahead in a
        background thread."""
        from concurrent.futures import ThreadPoolExecutor

        rows = self._rows(start_step * self.batch_size)
        with (
            ThreadPoolExecutor(self.decode_workers) as pool,
            ThreadPoolExecutor(1) as ahead,
        ):

            def make(step: int) -> dict[str, torch.Tensor]:
                return self._collate([next(rows) for _ in range(self.batch_size)], step, pool)

            future, step = ahead.submit(make, start_step), start_step
            while True:
                batch = future.result()
                step += 1
                future = ahead.submit(make, step)
                yield batch

    def _rows(self, skip: int) -> Iterator[dict[str, Any]]:
        epoch = 0
        if self.epoch_rows:
            epoch, skip = divmod(skip, self.epoch_rows)
        while True:
            self.dataset.set_epoch(epoch)
            count = 0
            for row in self.dataset:
                count += 1
                if skip:
                    skip -= 1
                    continue
                yield row
            if count == 0:
                raise InputError("the pair shards hold no pairs")
            self.epoch_rows = count
            epoch += 1

    def _collate(self, rows: list[dict[str, Any]], step: int, pool=None) -> dict[str, torch.Tensor]:
        batch = {}
        if self.crop == "random":
            boxes = crop_draws(self.seed, step, len(rows), self.crop_scale)
        else:
            boxes = np.broadcast_to(np.array([1.0, 0.5, 0.5]), (len(rows), 2, 3))
        run = pool.map if pool is not None else map
        for side, name in enumerate(IMAGE_FIELDS):
            pixels = list(
                run(
                    lambda r, box, name=name, side=side: decode_crop(
                        r[name], self.image_size, box[side], where=name
                    ),
                    rows,
                    boxes,
                )
            )
            batch[name] = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
        for name in EMBEDDING_FIELDS:
            batch[name] = torch.from_numpy(np.stack([r[name] for r in rows]).astype(np.float32))
        if self.tokens:
            for name in TOKEN_FIELDS:
                # float16 as stored: half the host memory and transfer; the model normalises
                # them in float32.
                batch[name] = torch.from_numpy(np.stack([r[name] for r in rows]))
        return batch


def crop_draws(seed: int, step: int, n: int, crop_scale: float) -> np.ndarray:
    """Random crop boxes of batch `step`: (n, 2 sides, 3) as (scale, x, y) fractions.

    scale is uniform in [crop_scale, 1] (the box side over the shorter side); x and y place
    the box uniformly in the room left along each axis. Drawn from their own generator seeded
    by (seed, step), apart from `step_generator`'s draws, so a resumed step crops the same.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, step, 1]))
    u = rng.random((n, 2, 3))
    u[..., 0] = crop_scale + (1.0 - crop_scale) * u[..., 0]
    return u


def decode_crop(data: bytes, size: int, box: Sequence[float], where: str = "image") -> np.ndarray:
    """Decode image bytes to a uint8 (size, size, 3) RGB square: the box (scale, x, y) of
    `crop_draws` cropped and resized (bicubic) in one resampling (`pairmill.data.decode_pixels`;
    (1, 0.5, 0.5) is its center crop)."""
    return decode_pixels(data, size, where=where, box=box)


def conditioning_dims(shards: Sequence[str]) -> tuple[int, tuple[int, int] | None]:
    """(embedding dimension, (token_count, token_dim) or None if the shards carry no
    patch tokens), from the first pair."""
    try:
        row = next(read_pairs(list(shards), columns=["cond_embedding", TOKEN_FIELDS[0]]), None)
    except InputError as exc:
        if f"has no column {TOKEN_FIELDS[0]!r}" not in str(exc):
            raise
        row = next(read_pairs(list(shards), columns=["cond_embedding"]), None)
    if row is None:
        raise InputError("the pair shards hold no pairs")
    tokens = row.get(TOKEN_FIELDS[0])
    shape = None if tokens is None else (int(tokens.shape[0]), int(tokens.shape[1]))
    return int(len(row["cond_embedding"])), shape


def embedding_dim(shards: Sequence[str]) -> int:
    """The conditioning embedding's dimension, from the first pair."""
    return conditioning_dims(shards)[0]


def run_encoder(shards: Sequence[str]) -> dict[str, Any] | None:
    """The encoder block (name, weights source/sha256/seed) of the shards' run manifest.

    Looks for ``manifest.json`` in each argument (a run directory), its parent (a ``pairs/``
    directory) and its grandparent (a shard file). None if no manifest is found.
    Raises ConfigError if the shards come from runs with different encoders.
    """
    import fsspec

    found: dict[str, Any] | None = None
    for shard in shards:
        base = str(shard).rstrip("/")
        for candidate in (base, os.path.dirname(base), os.path.dirname(os.path.dirname(base))):
            if not candidate:
                continue
            fs, path = fsspec.core.url_to_fs(f"{candidate}/manifest.json")
            if fs.isfile(path):
                with fs.open(path, "rb") as handle:
                    encoder = json.loads(handle.read()).get("encoder")
                key = _encoder_key(encoder)
                if found is not None and _encoder_key(found) != key:
                    raise ConfigError(f"{shard} was embedded with another encoder: {key}")
                found = encoder
                break
    if found is None:
        return None
    weights = found.get("weights") or {}
    info = {
        "name": found.get("name"),
        "embed_dim": found.get("embed_dim"),
        "weights": {k: weights.get(k) for k in ("source", "path", "sha256", "seed", "semantic")},
    }
    if found.get("token_grid") is not None:
        # The grid the build pooled tokens to (0: native): sampling must pool the same way.
        info["token_grid"] = int(found["token_grid"])
    return info


def _encoder_key(encoder: dict | None) -> tuple:
    weights = (encoder or {}).get("weights") or {}
    encoder = encoder or {}
    return (
        encoder.get("name"),
        weights.get("sha256"),
        weights.get("seed"),
        encoder.get("token_grid"),
    )


# ---------------------------------------------------------------------------------------------
# One step


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of every draw of `step` (so a resumed step draws the same)."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def prepare_batch(
    batch: dict[str, torch.Tensor], objective: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(target images in [-1, 1], conditioning embeddings, conditioning tokens or None).

    ``pairs``: each unordered pair is stored once, so its sides are swapped with
    probability 1/2 (images, embeddings and tokens together). ``reconstruct``: the target is
    the conditioning image itself. Tokens are None when the batch has none.
    """
    cond_img, cond_emb = batch["cond_image"], batch["cond_embedding"]
    tokens = batch.get("cond_tokens")
    if objective == "reconstruct":
        target = cond_img
    else:
        flip = torch.rand(cond_img.shape[0], generator=gen) < 0.5
        target = torch.where(flip[:, None, None, None], cond_img, batch["target_image"])
        cond_emb = torch.where(flip[:, None], batch["target_embedding"], cond_emb)
        if tokens is not None:
            tokens = torch.where(flip[:, None, None], batch["target_tokens"], tokens)
    return target.float() / 127.5 - 1.0, cond_emb, tokens


def training_step(
    model: Denoiser,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    batch: dict[str, torch.Tensor],
    config: TrainConfig,
    step: int,
    device: torch.device,
) -> torch.Tensor:
    """One optimizer update; returns the (detached) loss."""
    gen = step_generator(config.seed, step)
    x, cond, tokens = prepare_batch(batch, config.objective, gen)
    n = x.shape[0]
    t = torch.rand(n, generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    drop = torch.rand(n, generator=gen) < config.cond_drop
    cuda = device.type == "cuda"
    layout = torch.channels_last if cuda else torch.contiguous_format
    x, eps = (a.to(device, non_blocking=True, memory_format=layout) for a in (x, eps))
    t, cond, drop = t.to(device), cond.to(device), drop.to(device)
    if tokens is not None:
        tokens = tokens.to(device, non_blocking=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        loss = diffusion_loss(model, schedule, x, cond, t, eps, drop, tokens)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def update_ema(ema: Denoiser, model: Denoiser, decay: float, step: int) -> None:
    """EMA of the weights; the warm-up lets short runs' EMA track the model."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - d)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def rng_states() -> dict[str, Any]:
    """Global torch/numpy/python RNG states as plain tensors and lists (weights_only-safe)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` saved."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (a crash never leaves a truncated checkpoint)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """A checkpoint, loaded with ``weights_only=True`` (it holds only tensors and plain data)."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if state.get("format") != CKPT_FORMAT:
        raise InputError(f"{path} is not a pairmill training checkpoint")
    return state


# ---------------------------------------------------------------------------------------------
# The loop


def resolve_train_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def train(config: TrainConfig, echo: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Train (or resume from ``out/latest.pt``) up to `config.steps`; returns a summary.

    Writes ``ckpt-<step>.pt`` every `ckpt_every` steps and at the end, each also copied to
    ``latest.pt``.
    """
    config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_train_device(config.device)
    latest = out / "latest.pt"
    resumed = load_checkpoint(latest) if latest.exists() else None

    torch.manual_seed(config.seed)
    cond_dim, token_shape = conditioning_dims(config.shards)
    use_tokens = config.tokens and token_shape is not None
    token_dim = token_shape[1] if use_tokens else 0
    mcfg = model_config(config.model, config.image_size, cond_dim, token_dim)
    model = build_model(mcfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=tuple(config.betas))
    encoder = run_encoder(config.shards)
    if use_tokens:
        # What sampling needs to encode conditioning images as the shards' tokens were.
        encoder = dict(encoder or {}, token_count=token_shape[0])
        encoder.setdefault("token_grid", math.isqrt(token_shape[0]))
    step, epoch_rows = 0, None
    if resumed is not None:
        # Through ModelConfig: checkpoints from before tokens lack token_dim (0 by default).
        if ModelConfig(**resumed["model_config"]).to_dict() != mcfg.to_dict():
            raise ConfigError(
                f"{latest} holds another model ({resumed['model_config']}, not "
                f"{mcfg.to_dict()}); use another --out to start a new run"
            )
        _check_resumable(resumed["config"], config, latest)
        model.load_state_dict(resumed["model"])
        ema.load_state_dict(resumed["ema"])
        optimizer.load_state_dict(resumed["optimizer"])
        set_rng_states(resumed["rng"])
        step, epoch_rows = resumed["step"], resumed["data"]["epoch_rows"]
        echo(f"resuming from {latest} at step {step}")
    if device.type == "cuda":
        model.to(device, memory_format=torch.channels_last)
        ema.to(device, memory_format=torch.channels_last)
        _optimizer_to(optimizer, device)
    schedule = Schedule(image_size=config.image_size)
    stream = BatchStream(
        config.shards,
        config.batch_size,
        config.image_size,
        config.shuffle_buffer,
        config.seed,
        epoch_rows,
        tokens=use_tokens,
        crop=config.crop,
        crop_scale=config.crop_scale,
        decode_workers=config.decode_workers,
    )
    n_params = sum(p.numel() for p in model.parameters())
    echo(
        f"training {config.model} ({n_params / 1e6:.2f}M params) at {config.image_size}px, "
        f"objective {config.objective}, "
        + (f"cross-attention to {token_shape[0]} tokens, " if use_tokens else "")
        + f"on {device}, steps {step}->{config.steps}"
    )

    def checkpoint() -> None:
        state = {
            "format": CKPT_FORMAT,
            "step": step,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "config": config.to_dict(),
            "model_config": mcfg.to_dict(),
            "encoder": encoder,
            "rng": rng_states(),
            "data": {"epoch_rows": stream.epoch_rows},
        }
        path = out / f"ckpt-{step:07d}.pt"
        save_checkpoint(path, state)
        save_checkpoint(latest, state)
        echo(f"saved {path}")

    model.train()
    batches = stream.batches(step)
    # The running loss stays on the device: a .item() per step would sync a GPU every step.
    total, count, last_loss, tick, images = torch.zeros((), device=device), 0, float("nan"), 0, 0
    tick = time.time()
    while step < config.steps:
        loss = training_step(model, optimizer, schedule, next(batches), config, step, device)
        update_ema(ema, model, config.ema, step)
        step += 1
        total, count, images = total + loss.float(), count + 1, images + config.batch_size
        if step % config.log_every == 0 or step == config.steps:
            last_loss, elapsed = float(total) / count, time.time() - tick
            echo(f"step {step}/{config.steps} loss {last_loss:.4f} {images / elapsed:.1f} img/s")
            total, count, tick, images = torch.zeros((), device=device), 0, time.time(), 0
        if step % config.ckpt_every == 0 or step == config.steps:
            checkpoint()
    return {"step": step, "loss": last_loss, "out": str(out)}


# What the data stream and each step's draws depend on: a resumed run must keep them.
# (Using tokens or not shows in the model config, checked separately.)
_RESUME_KEYS = ("shards", "model", "image_size", "batch_size", "seed", "shuffle_buffer")
_RESUME_KEYS += ("objective", "cond_drop", "crop", "crop_scale")
# What checkpoints written before a key existed were trained with.
_LEGACY = {"crop": "center", "crop_scale": 1.0}


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    current = config.to_dict()
    for key in _RESUME_KEYS:
        before = saved.get(key, _LEGACY.get(key))
        if before != current[key]:
            raise ConfigError(
                f"{path} was trained with {key}={before!r}, not {current[key]!r}; "
                "use another --out to start a new run"
            )


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            # Adam's "step" stays on the CPU unless capturable; moving it breaks that check.
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device)
