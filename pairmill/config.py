"""The configuration of one build, validated before any pipeline graph is built."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pairmill.crawl import INPUT_FORMATS
from pairmill.errors import ConfigError

DEFAULT_MAX_IMAGES_PER_EPISODE = 64
DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
DEFAULT_SHARD_SIZE_MB = 256.0
FORMATS = ("parquet", "tfrecord")
COMPRESSIONS = ("none", "gzip")


@dataclass
class BuildConfig:
    """Everything that decides a build's output.

    Args:
      inputs: crawl files, directories or globs (local or fsspec URLs).
      out: the run directory (local path or fsspec URL).
      input_format: auto (per file), table, documents or img2dataset.
      page_column: img2dataset's page URL column (None tries page_url, page, source_url,
        webpage).
      encoder: encoder preset name.
      weights: None (hub cache), "random", or a local checkpoint path.
      low, high: the similarity band; None takes the encoder preset's.
      format: pair shard format (parquet or tfrecord).
      compression: TFRecord compression (none or gzip).
      max_images_per_episode: the cap per page.
      max_pairs_per_episode: keep at most this many in-band pairs per page.
      min_side, max_aspect, max_pixels: decode filters.
      resize, image_size, image_format, quality: re-encoding of stored images.
      max_image_bytes: largest image read from image_path or over HTTP.
      fetch: fetch records that only have an image_url (http/https).
      fetch_timeout, retries, fetch_per_host, fetch_concurrency, user_agent: HTTP fetching.
      max_pages_per_image: the same bytes on more pages are boilerplate (None: keep all).
      store_tokens: also store the encoder's patch tokens (float16) per image and per
        pair side (schemas image_v2 / pair_v2), for cross-attention conditioning.
      token_grid: average-pool the stored tokens to token_grid x token_grid (0: the
        encoder's native patch grid).
      device: auto, cpu or cuda.
      batch_size: encoder batch size.
      seed: seed of random weights.
      shard_rows, shard_size_mb: shard sizing targets.
      overwrite: replace an existing run in `out`.
      from_run: the run this one re-filters (no crawl input then).
    """

    inputs: list[str]
    out: str
    input_format: str = "auto"
    page_column: str | None = None
    encoder: str = "dinov2-vitb14"
    weights: str | None = None
    low: float | None = None
    high: float | None = None
    format: str = "parquet"
    compression: str = "none"
    max_images_per_episode: int = DEFAULT_MAX_IMAGES_PER_EPISODE
    max_pairs_per_episode: int | None = None
    min_side: int = 64
    max_aspect: float = 3.0
    max_pixels: int = 64 * 2**20
    resize: str = "no"
    image_size: int = 256
    image_format: str | None = None
    quality: int = 95
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pages_per_image: int | None = 10
    fetch: bool = True
    fetch_timeout: float = 10.0
    retries: int = 3
    fetch_per_host: int = 4
    fetch_concurrency: int = 32
    user_agent: str | None = None
    store_tokens: bool = False
    token_grid: int = 0
    device: str = "auto"
    batch_size: int = 32
    seed: int = 0
    shard_rows: int | None = None
    shard_size_mb: float = DEFAULT_SHARD_SIZE_MB
    overwrite: bool = False
    from_run: str | None = None

    def validate(self) -> BuildConfig:
        """Check every value and fill the band from the encoder preset; returns self."""
        from pairmill.encoders import get_preset

        preset = get_preset(self.encoder)
        if self.low is None:
            self.low = preset.low
        if self.high is None:
            self.high = preset.high
        _check(-1.0 <= self.low <= 1.0, f"--low must be in [-1, 1], got {self.low}")
        _check(-1.0 <= self.high <= 1.0, f"--high must be in [-1, 1], got {self.high}")
        _check(self.low <= self.high, f"--low ({self.low}) must not exceed --high ({self.high})")
        _check(self.format in FORMATS, f"--format must be one of {', '.join(FORMATS)}")
        _check(
            self.compression in COMPRESSIONS,
            f"--compression must be one of {', '.join(COMPRESSIONS)}",
        )
        _check(
            self.compression == "none" or self.format == "tfrecord",
            "--compression applies to --format tfrecord (Parquet compresses per column)",
        )
        _check(self.max_images_per_episode >= 2, "--max-images-per-episode must be at least 2")
        _check(
            self.max_pairs_per_episode is None or self.max_pairs_per_episode >= 1,
            "--max-pairs-per-episode must be at least 1",
        )
        _check(self.batch_size >= 1, "--batch-size must be at least 1")
        _check(self.max_image_bytes >= 1, "--max-image-bytes must be positive")
        _check(
            self.max_pages_per_image is None or self.max_pages_per_image >= 1,
            "--max-pages-per-image must be at least 1 (or 0 for no limit)",
        )
        _check(self.shard_rows is None or self.shard_rows >= 1, "--shard-rows must be at least 1")
        _check(self.shard_size_mb > 0, "--shard-size-mb must be positive")
        _check(bool(self.out), "--out is required")
        _check(
            self.input_format in INPUT_FORMATS,
            f"--input-format must be one of {'|'.join(INPUT_FORMATS)}, got {self.input_format!r}",
        )
        _check(
            self.page_column is None or bool(self.page_column.strip()),
            "--page-column must name a column",
        )
        _check(self.token_grid >= 0, "--token-grid must be at least 1 (or 0: native grid)")
        _check(
            self.store_tokens or not self.token_grid,
            "--token-grid applies to --store-tokens",
        )
        _check(
            self.token_grid <= preset.token_grid,
            f"--token-grid {self.token_grid} is finer than {preset.name}'s "
            f"{preset.token_grid}x{preset.token_grid} patch grid",
        )
        self.decode_config()  # validates the decode and re-encode flags
        self.fetch_config()  # validates the fetching flags
        return self

    def decode_config(self):
        from pairmill.images import DecodeConfig

        return DecodeConfig(
            min_side=self.min_side,
            max_aspect=self.max_aspect,
            max_pixels=self.max_pixels,
            resize=self.resize,
            image_size=self.image_size,
            image_format=self.image_format,
            quality=self.quality,
        )

    def fetch_config(self):
        """The HTTP fetcher's settings, or None when fetching is off."""
        if not self.fetch:
            return None
        from pairmill.fetch import FetchConfig

        extra = {"user_agent": self.user_agent} if self.user_agent else {}
        return FetchConfig(
            timeout=self.fetch_timeout,
            max_bytes=self.max_image_bytes,
            retries=self.retries,
            per_host=self.fetch_per_host,
            concurrency=self.fetch_concurrency,
            **extra,
        )

    def schema_ids(self) -> dict[str, str]:
        """The schema of each table this build writes."""
        return schema_ids(self.store_tokens)

    def writer_options(self) -> dict:
        """Options of the pair shard writer."""
        return {"compression": self.compression} if self.format == "tfrecord" else {}

    def to_dict(self) -> dict:
        return asdict(self)


def schema_ids(store_tokens: bool) -> dict[str, str]:
    """Table -> schema id: pair_v2 / image_v2 (v1 plus patch tokens) with --store-tokens."""
    version = 2 if store_tokens else 1
    return {
        "pairs": f"pair_v{version}",
        "images": f"image_v{version}",
        "similarities": "similarity_v1",
        "rejects": "reject_v1",
    }


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
