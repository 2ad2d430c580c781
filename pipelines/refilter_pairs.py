"""Re-filter an earlier run with a new similarity band, without decoding or embedding again.

Reads the run's images table (bytes and embeddings) and rejects table, pairs
every episode again with the new band, and writes a complete new run whose
manifest says which run it came from. Its pairs are exactly those a fresh
build with the same band gives.

    python -m pipelines.refilter_pairs --from-run runs/a --out runs/b --low 0.4 --high 0.85
"""

from __future__ import annotations

import argparse
import dataclasses

import apache_beam as beam
import numpy as np

from pairmill import manifest
from pairmill.config import BuildConfig
from pairmill.errors import ConfigError
from pairmill.transforms import PairWithinEpisodes, ReadRunTable
from pipelines.build_pairs import _optional_int, execute, with_default_runner, write_run

# What a re-filter may change; everything else is the source run's.
OVERRIDABLE = (
    "low",
    "high",
    "max_pairs_per_episode",
    "format",
    "compression",
    "shard_rows",
    "shard_size_mb",
)


# Funnel stages a re-filter cannot see (they ran before the images table existed).
UPSTREAM = ("selected", "loaded")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refilter_pairs", description=__doc__.splitlines()[0])
    p.add_argument("--from-run", required=True, help="the run to re-filter")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--low", type=float, default=None)
    p.add_argument("--high", type=float, default=None)
    p.add_argument("--max-pairs-per-episode", type=_optional_int, default=None)
    p.add_argument("--format", default=None)
    p.add_argument("--compression", default=None)
    p.add_argument("--shard-rows", type=_optional_int, default=None)
    p.add_argument("--shard-size-mb", type=float, default=None)
    p.add_argument("--overwrite", action="store_true")
    return p


def parse_known_args(argv: list[str] | None) -> tuple[BuildConfig, dict, list[str]]:
    """(validated config of the new run, the source run's manifest, Beam flags)."""
    known, pipeline_args = parser().parse_known_args(argv)
    if known.from_run.rstrip("/") == known.out.rstrip("/"):
        raise ConfigError("--out must differ from --from-run")
    source = manifest.load_manifest(known.from_run)
    fields = {f.name for f in dataclasses.fields(BuildConfig)}
    values = {k: v for k, v in source["config"].items() if k in fields}
    values.update(out=known.out, overwrite=known.overwrite, from_run=known.from_run)
    values["max_pairs_per_episode"] = None  # a new band starts uncapped unless asked
    for name in OVERRIDABLE:
        value = getattr(known, name)
        if value is not None:
            values[name] = value
    config = BuildConfig(**values).validate()
    pipeline_args = with_default_runner(pipeline_args)
    return config, source, pipeline_args


def _table_urls(run: str, source: dict, table: str) -> list[str]:
    return [f"{run.rstrip('/')}/{shard['path']}" for shard in source["tables"][table]["shards"]]


def _light(row: dict):
    return row["episode_id"], (row["image_id"], np.asarray(row["embedding"], dtype=np.float32))


def build(p: beam.Pipeline, config: BuildConfig, source: dict) -> None:
    """Chain the re-filter's stages onto pipeline `p`."""
    run = config.from_run
    images = p | "ReadImages" >> ReadRunTable(_table_urls(run, source, "images"))
    rejects = p | "ReadRejects" >> ReadRunTable(_table_urls(run, source, "rejects"))
    paired = (
        images
        | "Light" >> beam.Map(_light)
        | "PairWithinEpisodes"
        >> PairWithinEpisodes(config.low, config.high, config.max_pairs_per_episode)
    )
    counts = (
        images | "CountImagesIn" >> beam.Map(lambda _: ("records_in", 1)),
        rejects | "CountRejectsIn" >> beam.Map(lambda _: ("records_in", 1)),
        images
        | "Contents" >> beam.Map(lambda row: row["sha256"])
        | "Unique" >> beam.Distinct()
        | "CountUnique" >> beam.Map(lambda _: ("unique_images", 1)),
        paired.stats,
        # Stages before pairing happened in the source run: carry its funnel over.
        p
        | "SourceFunnel"
        >> beam.Create(
            [(name, source["counts"].get("funnel", {}).get(name, 0)) for name in UPSTREAM]
        ),
    ) | "Counts" >> beam.Flatten()
    tables = {
        "kept_pairs": paired.pairs,
        "images": images,
        "similarities": paired.similarities,
        "rejects": rejects,
        "counts": counts,
    }
    write_run(tables, config)


def run(argv: list[str] | None = None, test_pipeline=None):
    """Run a re-filter; returns the Beam PipelineResult (manifest in `.pairmill_manifest`)."""
    config, source, pipeline_args = parse_known_args(argv)
    manifest.prepare_output(config.out, config.overwrite)
    return execute(
        config,
        pipeline_args,
        test_pipeline,
        lambda p: build(p, config, source),
        source["encoder"],
        f"re-filtering {config.from_run} -> {config.out}, band {config.low:g}..{config.high:g}",
        from_run={
            "run": config.from_run,
            "thresholds": source["thresholds"],
            "created_unix": source.get("created_unix"),
            "counts": source["counts"],
        },
    )


if __name__ == "__main__":
    run()
