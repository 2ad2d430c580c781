"""Build filtered image-pair shards from a crawl (the main pairmill job).

Thin entry point: parses flags, validates them before the graph exists, chains
library transforms under readable labels, runs, and writes the manifest.

    python -m pipelines.build_pairs crawl.parquet --out runs/x --encoder tiny \
        --runner FnApiRunner
"""

from __future__ import annotations

import argparse
import logging
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pairmill import manifest
from pairmill.config import BuildConfig
from pairmill.crawl import expand_inputs
from pairmill.embedding import EncoderModelHandler
from pairmill.encoders import DEFAULT_ENCODER, get_preset, resolve_device, resolve_weights
from pairmill.transforms import (
    REJECTS,
    DecodeImages,
    DropBoilerplate,
    EmbedImages,
    GroupIntoEpisodes,
    LoadImageBytes,
    PairWithinEpisodes,
    ReadCrawl,
    WriteRun,
)

DEFAULT_RUNNER = "FnApiRunner"
log = logging.getLogger("pairmill")


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "0", "") else int(text)


def with_default_runner(pipeline_args: list[str]) -> list[str]:
    """Beam flags with `--runner FnApiRunner` unless one was given: Beam's own default,
    the DirectRunner, first tries to download the Prism runner binary."""
    if any(arg == "--runner" or arg.startswith("--runner=") for arg in pipeline_args):
        return pipeline_args
    return ["--runner", DEFAULT_RUNNER, *pipeline_args]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build_pairs", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="crawl files, directories or globs")
    p.add_argument("--input-format", default="auto", help="auto|table|documents|img2dataset")
    p.add_argument("--page-column", default=None, help="img2dataset: the page URL column")
    p.add_argument("--out", required=True, help="run directory (local path or fsspec URL)")
    p.add_argument("--encoder", default=DEFAULT_ENCODER)
    p.add_argument("--weights", default=None, help="checkpoint path, or 'random'")
    p.add_argument("--low", type=float, default=None)
    p.add_argument("--high", type=float, default=None)
    p.add_argument("--format", default="parquet")
    p.add_argument("--compression", default="none")
    p.add_argument("--max-images-per-episode", type=int, default=64)
    p.add_argument("--max-pairs-per-episode", type=_optional_int, default=None)
    p.add_argument("--min-side", type=int, default=64)
    p.add_argument("--max-aspect", type=float, default=3.0)
    p.add_argument("--max-pixels", type=int, default=64 * 2**20)
    p.add_argument("--resize", default="no")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--image-format", default=None)
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--max-image-bytes", type=int, default=20 * 2**20)
    p.add_argument("--max-pages-per-image", type=_optional_int, default=10)
    p.add_argument("--no-fetch", dest="fetch", action="store_false")
    p.add_argument("--fetch-timeout", type=float, default=10.0)
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--fetch-per-host", type=int, default=4)
    p.add_argument("--fetch-concurrency", type=int, default=32)
    p.add_argument("--user-agent", default=None)
    p.add_argument("--store-tokens", action="store_true")
    p.add_argument("--token-grid", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-rows", type=_optional_int, default=None)
    p.add_argument("--shard-size-mb", type=float, default=256.0)
    p.add_argument("--overwrite", action="store_true")
    return p


def parse_known_args(argv: list[str] | None) -> tuple[BuildConfig, list[str]]:
    """Split argv into a validated `BuildConfig` and the remaining Beam pipeline flags."""
    known, pipeline_args = parser().parse_known_args(argv)
    values = {k: v for k, v in vars(known).items()}
    config = BuildConfig(**values).validate()
    pipeline_args = with_default_runner(pipeline_args)
    return config, pipeline_args


def build(p: beam.Pipeline, config: BuildConfig, files: list[str], handler) -> None:
    """Chain the build's stages onto pipeline `p`."""
    read = p | "ReadCrawl" >> ReadCrawl(files, config.input_format, config.page_column)
    episodes = read.records | "GroupIntoEpisodes" >> GroupIntoEpisodes(
        config.max_images_per_episode
    )
    loaded = episodes["records"] | "LoadImageBytes" >> LoadImageBytes(
        config.max_image_bytes, config.fetch_config()
    )
    records, boilerplate_rejects = loaded.records, []
    if config.max_pages_per_image:
        kept = records | "DropBoilerplate" >> DropBoilerplate(config.max_pages_per_image)
        records, boilerplate_rejects = kept.records, [kept[REJECTS]]
    decoded = records | "DecodeImages" >> DecodeImages(config.decode_config(), config.encoder)
    embedded = decoded.decoded | "EmbedImages" >> EmbedImages(handler, config.encoder)
    paired = embedded.light | "PairWithinEpisodes" >> PairWithinEpisodes(
        config.low, config.high, config.max_pairs_per_episode
    )
    rejects = (
        read[REJECTS],
        episodes[REJECTS],
        loaded[REJECTS],
        *boilerplate_rejects,
        decoded[REJECTS],
    ) | "AllRejects" >> beam.Flatten()
    counts = (
        read.records | "CountRead" >> beam.Map(lambda _: ("records_in", 1)),
        read[REJECTS] | "CountUnreadable" >> beam.Map(lambda _: ("records_in", 1)),
        decoded.decoded | "CountUnique" >> beam.Map(lambda _: ("unique_images", 1)),
        episodes["records"] | "CountSelected" >> beam.Map(lambda _: ("selected", 1)),
        loaded.records | "CountLoaded" >> beam.Map(lambda _: ("loaded", 1)),
        paired.stats,
    ) | "Counts" >> beam.Flatten()
    tables = {
        # The pairs table is written from these and the image rows (`WritePairShards`).
        "kept_pairs": paired.pairs,
        "images": embedded.images | "ImageRows" >> beam.Values(),
        "similarities": paired.similarities,
        "rejects": rejects,
        "counts": counts,
    }
    write_run(tables, config)


def write_run(tables: dict, config: BuildConfig) -> None:
    """Write a run's tables and report with the config's pair format and shard sizes."""
    _ = tables | "WriteRun" >> WriteRun(
        config.out,
        config.format,
        config.writer_options(),
        config.shard_rows,
        config.shard_size_mb,
        config.schema_ids(),
        encoder=config.encoder,
    )


def execute(config, pipeline_args, test_pipeline, build_graph, encoder, describe, from_run=None):
    """Run a graph built by `build_graph(p)`, then write the manifest and check the counts.

    Shared by the build and the re-filter; returns the PipelineResult with the manifest
    in `.pairmill_manifest`.
    """
    options = PipelineOptions(pipeline_args)
    runner = options.view_as(StandardOptions).runner or DEFAULT_RUNNER
    log.info("%s, runner %s", describe, runner)
    started = time.monotonic()
    p = test_pipeline or beam.Pipeline(options=options)
    build_graph(p)
    result = p.run()
    result.wait_until_finish()
    result.pairmill_manifest = manifest.finish_run(
        config.out,
        config.to_dict(),
        encoder,
        time.monotonic() - started,
        runner,
        config.format,
        config.writer_options(),
        from_run=from_run,
    )
    manifest.check_reconciled(result.pairmill_manifest, config.out)
    return result


def run(argv: list[str] | None = None, test_pipeline=None):
    """Run a build; returns the Beam PipelineResult (the manifest is in --out)."""
    config, pipeline_args = parse_known_args(argv)
    files = expand_inputs(config.inputs, config.input_format)
    preset = get_preset(config.encoder)
    weights = resolve_weights(preset, config.weights, seed=config.seed)
    device = resolve_device(config.device)
    manifest.prepare_output(config.out, config.overwrite)
    token_grid = (config.token_grid or preset.token_grid) if config.store_tokens else None
    handler = EncoderModelHandler(
        config.encoder, weights, device, config.batch_size, config.seed, token_grid
    )

    encoder = {
        "name": preset.name,
        "family": preset.family,
        "arch": preset.arch,
        "image_size": preset.image_size,
        "embed_dim": preset.embed_dim,
        "device": device,
        "batch_size": config.batch_size,
        "weights": weights.to_dict(),
        # Side of the stored patch-token grid (None: no tokens); a trainer encodes its
        # conditioning images with the same pooling.
        "token_grid": token_grid,
    }
    describe = (
        f"building {len(files)} crawl file(s) -> {config.out} with {config.encoder} "
        f"({weights.description}) on {device}, band {config.low:g}..{config.high:g}"
    )
    return execute(
        config,
        pipeline_args,
        test_pipeline,
        lambda p: build(p, config, files, handler),
        encoder,
        describe,
    )


if __name__ == "__main__":
    run()
