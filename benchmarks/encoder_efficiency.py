"""How close does a whole `pairmill build` come to the bare encoder loop?

Builds a crawl of N distinct real photos (random crops, flips, scales and
colour shifts of the photographs scikit-image and scikit-learn ship, so every
image is a unique content that must be decoded and embedded), then in the same
run times:

  bare      the encoder alone on preprocessed tensors, same batch size and threads
  pipeline  `pairmill build` as a separate process, start to exit: interpreter
            and imports, Beam graph, model load, reading, decoding, embedding,
            pairing, writing shards and the manifest

and prints pipeline images/s divided by bare images/s. The bare loop runs
before and after the build and the faster of the two is used, so the ratio is
not flattered by a slow baseline. Random weights (`--weights random`): the
timing is that of the real architecture; nothing here is semantic.

    python benchmarks/encoder_efficiency.py --n 2048 --encoder clip-vitb32

`--store-tokens [--token-grid N]` builds with patch tokens (the baseline stays the bare
loop, which computes the same forward pass): the ratio then shows what carrying the
tokens through the pipeline and into the shards costs, and the run's table sizes show
what they weigh.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_crawl(directory: Path, n: int, per_page: int, seed: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pairmill.sample import jpeg_bytes, real_photos, variant

    rng = np.random.default_rng(seed)
    photos = real_photos()
    rows = []
    for i in range(n):
        name, photo = photos[int(rng.integers(len(photos)))]
        image = variant(photo, rng, min_side=224, max_side=480)
        rows.append(
            {
                "page_url": f"https://bench.example/page/{i // per_page}",
                "image_url": f"https://cdn.bench.example/{i}-{name}.jpg",
                "image": jpeg_bytes(image),
            }
        )
    path = directory / "crawl.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=256)
    return path


def bare_loop(encoder, pixels: np.ndarray, batch_size: int) -> float:
    """Seconds for the model alone over all images (inputs already normalised tensors)."""
    import torch

    batches = [
        encoder.to_input(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)
    ]
    with torch.inference_mode():
        encoder.forward(batches[0])  # warm-up, as the pipeline's first batch also pays it
        started = time.perf_counter()
        for batch in batches:
            encoder.forward(batch)
        return time.perf_counter() - started


def preprocess_all(crawl: Path, preset) -> np.ndarray:
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from pairmill.encoders import preprocess

    images = pq.read_table(crawl, columns=["image"]).column("image").to_pylist()
    return np.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB"), preset) for b in images])


def run_build(crawl: Path, out: Path, encoder: str, batch_size: int, extra: list[str]) -> float:
    command = [
        sys.executable,
        "-m",
        "pairmill.cli",
        "build",
        str(crawl),
        "--out",
        str(out),
        "--encoder",
        encoder,
        "--weights",
        "random",
        "--device",
        "cpu",
        "--batch-size",
        str(batch_size),
        "--quiet",
        "--overwrite",
        *extra,
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="distinct images")
    parser.add_argument("--per-page", type=int, default=8)
    parser.add_argument("--encoder", default="clip-vitb32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store-tokens", action="store_true")
    parser.add_argument("--token-grid", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    extra = ["--store-tokens", "--token-grid", str(args.token_grid)] if args.store_tokens else []

    import torch

    from pairmill.encoders import get_preset, load_encoder

    preset = get_preset(args.encoder)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        crawl = make_crawl(tmp, args.n, args.per_page, args.seed)
        pixels = preprocess_all(crawl, preset)
        encoder = load_encoder(preset, "random", device="cpu", seed=args.seed)
        bare_before = bare_loop(encoder, pixels, args.batch_size)
        pipeline_s = run_build(crawl, tmp / "run", args.encoder, args.batch_size, extra)
        manifest = json.loads((tmp / "run" / "manifest.json").read_text())
        bare_after = bare_loop(encoder, pixels, args.batch_size)

    bare_s = min(bare_before, bare_after)
    n = manifest["counts"]["images"]
    result = {
        "encoder": args.encoder,
        "weights": "random",
        "images": n,
        "store_tokens": args.store_tokens,
        "table_mb": {t: round(v["bytes"] / 2**20, 1) for t, v in manifest["tables"].items()},
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "bare_images_per_s": round(args.n / bare_s, 2),
        "pipeline_images_per_s": round(n / pipeline_s, 2),
        "pipeline_process_s": round(pipeline_s, 2),
        "pipeline_run_s": manifest["timing"]["seconds"],
        "ratio_whole_process": round(bare_s / pipeline_s * n / args.n, 3),
        "ratio_pipeline_run": round(bare_s / manifest["timing"]["seconds"] * n / args.n, 3),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"encoder {args.encoder} (random weights), {n} distinct images, batch {args.batch_size}, "
        f"{result['torch_threads']} torch threads"
    )
    sizes = ", ".join(f"{t} {mb} MB" for t, mb in result["table_mb"].items())
    print(f"tables: {sizes}" + (" (with patch tokens)" if args.store_tokens else ""))
    print(f"bare model loop      {result['bare_images_per_s']:8.2f} images/s")
    print(
        f"pairmill build       {result['pipeline_images_per_s']:8.2f} images/s "
        f"(whole process {pipeline_s:.1f} s, pipeline run {manifest['timing']['seconds']:.1f} s)"
    )
    print(f"ratio (whole process) {result['ratio_whole_process']:.3f}   target >= 0.85")
    print(f"ratio (pipeline run)  {result['ratio_pipeline_run']:.3f}")


if __name__ == "__main__":
    main()
