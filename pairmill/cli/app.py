"""Typer commands. Each calls a pipeline or a library function; none holds logic."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pairmill.cli import render

app = typer.Typer(
    name="pairmill",
    help="Build filtered web image-pair corpora (Apache Beam; DINOv2 / CLIP / SigLIP embeddings).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_BEAM_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pairmill: %(message)s"))
    log = logging.getLogger("pairmill")
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    # Beam logs each stage at INFO; keep its warnings only.
    logging.getLogger("apache_beam").setLevel(logging.WARNING)


@app.command(
    context_settings=_BEAM_PASSTHROUGH,
    help=(
        "Build pair shards from crawl files (Parquet, JSONL or CSV; paths, directories, globs "
        "or fsspec URLs): tables with page_url, image_url and image (bytes) or image_path "
        "(else the image is fetched over http/https), MMC4/OBELICS documents, or img2dataset "
        "output (see --input-format). Or re-filter an earlier run with --from-run. Extra "
        "--flags not listed here are passed to Apache Beam (e.g. --direct_num_workers 2, or "
        "--runner DataflowRunner --project P --region R --temp_location gs://…)."
    ),
)
def build(
    ctx: typer.Context,
    out: Annotated[str, typer.Option("--out", help="Run directory (path or fsspec URL).")],
    inputs: Annotated[
        Optional[list[str]], typer.Argument(help="Crawl files, directories or globs.")
    ] = None,
    input_format: Annotated[
        str,
        typer.Option(
            help="auto|table|documents|img2dataset. auto picks per file: .tar is img2dataset "
            "webdataset; image_info (MMC4) or images+general_metadata (OBELICS) is documents; "
            "Parquet with url, status and key is img2dataset; else table."
        ),
    ] = "auto",
    page_column: Annotated[
        Optional[str],
        typer.Option(
            help="img2dataset inputs: the column holding the page URL (default: the first of "
            "page_url, page, source_url, webpage)."
        ),
    ] = None,
    encoder: Annotated[
        str,
        typer.Option(
            help="Encoder preset: dinov2-vits14|dinov2-vitb14|dinov2-vitl14|"
            "clip-vitb32|clip-vitb16|clip-vitl14|siglip-vitb16|tiny."
        ),
    ] = "dinov2-vitb14",
    weights: Annotated[
        Optional[str],
        typer.Option(
            help="Checkpoint file (.safetensors/.pt), or 'random' (seeded, not "
            "semantic). Default: the Hugging Face cache, never downloaded."
        ),
    ] = None,
    low: Annotated[
        Optional[float], typer.Option(help="Lower similarity (default: preset's).")
    ] = None,
    high: Annotated[
        Optional[float], typer.Option(help="Upper similarity (default: preset's).")
    ] = None,
    format: Annotated[
        str, typer.Option("--format", help="Pair shard format: parquet|tfrecord.")
    ] = "parquet",
    compression: Annotated[str, typer.Option(help="TFRecord compression: none|gzip.")] = "none",
    max_images_per_episode: Annotated[int, typer.Option(help="Cap of images per page.")] = 64,
    max_pairs_per_episode: Annotated[
        Optional[int], typer.Option(help="Keep at most N in-band pairs per page (sampled).")
    ] = None,
    min_side: Annotated[
        int, typer.Option(help="Reject images whose shorter side is smaller.")
    ] = 64,
    max_aspect: Annotated[
        float, typer.Option(help="Reject images longer/shorter above this.")
    ] = 3.0,
    max_pixels: Annotated[int, typer.Option(help="Decompression-bomb limit (width*height).")] = 64
    * 2**20,
    resize: Annotated[
        str, typer.Option(help="Stored images: no|keep_ratio|center_crop|border.")
    ] = "no",
    image_size: Annotated[int, typer.Option(help="Target size for --resize.")] = 256,
    image_format: Annotated[
        Optional[str], typer.Option(help="Re-encode stored images: jpg|webp|png.")
    ] = None,
    quality: Annotated[int, typer.Option(help="JPEG/WebP quality when re-encoding.")] = 95,
    max_image_bytes: Annotated[
        int, typer.Option(help="Largest image read (file or HTTP body, enforced while streaming).")
    ] = 20 * 2**20,
    fetch: Annotated[
        bool,
        typer.Option(help="Fetch records that only have an image_url (http/https only)."),
    ] = True,
    fetch_timeout: Annotated[
        float, typer.Option(help="Seconds per HTTP attempt (connect, redirects and body).")
    ] = 10.0,
    retries: Annotated[int, typer.Option(help="HTTP retries on 429, 5xx and timeouts.")] = 3,
    fetch_per_host: Annotated[int, typer.Option(help="Concurrent requests per host.")] = 4,
    fetch_concurrency: Annotated[
        int, typer.Option(help="Concurrent requests per worker thread.")
    ] = 32,
    user_agent: Annotated[
        Optional[str], typer.Option(help="HTTP User-Agent (default names pairmill).")
    ] = None,
    max_pages_per_image: Annotated[
        int,
        typer.Option(
            help="The same bytes on more pages than this are boilerplate (logos, icons, "
            "placeholders) and dropped everywhere; 0 keeps them."
        ),
    ] = 10,
    store_tokens: Annotated[
        bool,
        typer.Option(
            help="Also store the encoder's patch tokens (float16) per image and pair side "
            "(schemas pair_v2/image_v2), for the trainer's cross-attention."
        ),
    ] = False,
    token_grid: Annotated[
        int,
        typer.Option(
            help="With --store-tokens: average-pool tokens to N x N (0: the encoder's "
            "patch grid, e.g. 16x16 for DINOv2 at 224 px)."
        ),
    ] = 0,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Encoder batch size.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of random weights.")] = 0,
    shard_rows: Annotated[Optional[int], typer.Option(help="Target rows per shard.")] = None,
    shard_size_mb: Annotated[float, typer.Option(help="Target MB per shard.")] = 256.0,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --out.")] = False,
    from_run: Annotated[
        Optional[str],
        typer.Option(
            help="Re-filter this earlier run with a new --low/--high (and --max-pairs-per-episode, "
            "--format, shard sizes) from its stored images and embeddings: no decoding, no "
            "encoder. No INPUT then."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the summary.")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the manifest counts as JSON.")
    ] = False,
) -> None:
    from pipelines import build_pairs

    inputs, beam_args = render.split_beam_args([*(inputs or []), *ctx.args])
    if from_run:
        _refilter(ctx, inputs, beam_args, out, from_run, locals())
        return
    if not inputs:
        raise _usage("missing INPUT: give crawl files, or --from-run RUN_DIR")
    argv = [*inputs, "--out", out, "--encoder", encoder, "--format", format]
    argv += ["--compression", compression]
    for flag, value in (
        ("--input-format", input_format),
        ("--page-column", page_column),
        ("--weights", weights),
        ("--low", low),
        ("--high", high),
        ("--max-images-per-episode", max_images_per_episode),
        ("--max-pairs-per-episode", max_pairs_per_episode),
        ("--min-side", min_side),
        ("--max-aspect", max_aspect),
        ("--max-pixels", max_pixels),
        ("--resize", resize),
        ("--image-size", image_size),
        ("--image-format", image_format),
        ("--quality", quality),
        ("--max-image-bytes", max_image_bytes),
        ("--max-pages-per-image", max_pages_per_image),
        ("--fetch-timeout", fetch_timeout),
        ("--retries", retries),
        ("--fetch-per-host", fetch_per_host),
        ("--fetch-concurrency", fetch_concurrency),
        ("--user-agent", user_agent),
        ("--token-grid", token_grid),
        ("--device", device),
        ("--batch-size", batch_size),
        ("--seed", seed),
        ("--shard-rows", shard_rows),
        ("--shard-size-mb", shard_size_mb),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if overwrite:
        argv.append("--overwrite")
    if not fetch:
        argv.append("--no-fetch")
    if store_tokens:
        argv.append("--store-tokens")
    _setup_logging(quiet or json_out)
    result = build_pairs.run(argv + beam_args)
    render.summary(result.pairmill_manifest, out, as_json=json_out)


def _usage(message: str):
    from pairmill.cli import _click_exceptions

    return _click_exceptions()[0](message)


def _refilter(ctx, inputs, beam_args, out, from_run, values) -> None:
    """`build --from-run`: only the band, pair sampling, format and sharding may change."""
    from pipelines import refilter_pairs

    if inputs:
        raise _usage("give either INPUT files or --from-run, not both")
    command = ctx.command
    changed = [
        param.opts[0]
        for param in command.params
        if param.name not in ("inputs", "out", "from_run", "overwrite", "quiet", "json_out")
        and ctx.get_parameter_source(param.name).name == "COMMANDLINE"
        and param.name not in refilter_pairs.OVERRIDABLE
    ]
    if changed:
        raise _usage(f"{changed[0]} cannot change in a re-filter (it is the source run's)")
    argv = ["--from-run", from_run, "--out", out]
    for name in refilter_pairs.OVERRIDABLE:
        value = values.get(name)
        if value is not None and ctx.get_parameter_source(name).name == "COMMANDLINE":
            argv += [f"--{name.replace('_', '-')}", str(value)]
    if values.get("overwrite"):
        argv.append("--overwrite")
    _setup_logging(values.get("quiet") or values.get("json_out"))
    result = refilter_pairs.run(argv + beam_args)
    render.summary(result.pairmill_manifest, out, as_json=values.get("json_out"))


def build_option_names() -> list[str]:
    """The flags `pairmill build` itself defines (for 'did you mean' hints)."""
    import typer.main

    command = typer.main.get_command(app).commands["build"]
    return [opt for param in command.params for opt in getattr(param, "opts", [])]


@app.command(help="Build the bundled sample crawl (real photos) with the tiny encoder.")
def demo(
    out: Annotated[Path, typer.Option(help="Where to write the sample crawl and the run.")] = Path(
        "runs/demo"
    ),
    pages: Annotated[int, typer.Option(help="Pages in the sample crawl.")] = 12,
    images_per_page: Annotated[int, typer.Option(help="Images per page.")] = 8,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    from pairmill.sample import make_sample_crawl
    from pipelines import build_pairs

    _setup_logging(quiet)
    logging.getLogger("pairmill").info("writing a sample crawl of real photos to %s", out / "crawl")
    crawl = make_sample_crawl(out / "crawl", pages=pages, images_per_page=images_per_page)
    run_dir = out / "run"
    result = build_pairs.run(
        [str(crawl), "--out", str(run_dir), "--encoder", "tiny", "--overwrite", "--device", "cpu"]
    )
    render.summary(result.pairmill_manifest, str(run_dir))
    print(
        f"\nsample crawl: {crawl}\nrun:          {run_dir}  (manifest.json, pairs/, images/, "
        "similarities/, rejects/)"
    )
    print("the tiny encoder has random weights: its similarities are not semantic.")
    print(
        "\nnext:\n"
        f"  pairmill inspect {run_dir} --png {out / 'pairs.png'}\n"
        f"  pairmill hist {run_dir} --png {out / 'hist.png'}\n"
        f"  pairmill validate {run_dir}"
    )


@app.command(help="Print the pairmill version.")
def version() -> None:
    from pairmill import __version__

    print(__version__)


# Each analysis command lives in its own module with a `register(app)` function.
_COMMAND_MODULES = (
    "cmd_validate",
    "cmd_inspect",
    "cmd_hist",
    "cmd_calibrate",
    "cmd_train",
    "cmd_sample",
    "cmd_eval",
)


def _register_commands() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"pairmill.cli.{name}").register(app)


_register_commands()
