"""Pairs vs reconstruction on real digits: the paper's one-shot comparison, at toy scale.

scikit-learn's handwritten digits (8x8, upscaled to 32x32 RGB: bicubic, then a slight blur)
become a crawl: one "page" per group of 8 images of one digit. A per-class split holds out
``--test-per-class`` images of each digit. pairmill builds a pair corpus from the training
pages (tiny encoder, random weights; band --low -1 --high 0.999 keeps nearly every pair),
then the SAME tiny model is trained with ``--objective pairs`` and with
``--objective reconstruct`` for the same steps, and both are evaluated one-shot on the
held-out digits: one conditioning image per class, N/10 samples each.

Two feature spaces are reported: the tiny encoder's (random weights: not semantic), and
the digits' native space (8x8 grayscale pixels, area-downsampled from the 32x32 images),
which is crude but meaningful. Copy threshold per space: the 99th percentile of cosine
similarities between distinct held-out images of the same digit (a real, different digit is
a "copy" 1 % of the time). A "copy oracle" row (every sample = its conditioning image) shows
what pure copying scores.

    OMP_NUM_THREADS=1 python benchmarks/pairs_vs_reconstruction.py --out /tmp/digits --steps 2000
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

PAGE_SIZE = 8


def digit_images(blur: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 (N, 32, 32, 3) RGB and their labels."""
    from PIL import Image, ImageFilter
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for image in digits.images:
        small = Image.fromarray(np.clip(image * 16, 0, 255).astype(np.uint8))
        big = small.resize((32, 32), Image.Resampling.BICUBIC).filter(
            ImageFilter.GaussianBlur(blur)
        )
        out.append(np.stack([np.asarray(big)] * 3, axis=-1))
    return np.stack(out), digits.target.astype(int)


def split(labels: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class held-out split: (train indices, test indices)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        test += members[:test_per_class].tolist()
        train += members[test_per_class:].tolist()
    return np.array(train), np.array(test)


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_crawl(images, labels, train, path: Path, seed: int) -> int:
    """A crawl Parquet: pages of PAGE_SIZE same-digit training images; returns the pages."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows, pages = [], 0
    for digit in range(10):
        members = rng.permutation(train[labels[train] == digit])
        for start in range(0, len(members) - PAGE_SIZE + 1, PAGE_SIZE):
            page_url = f"https://digits.example.org/{digit}/page-{pages}"
            for i in members[start : start + PAGE_SIZE]:
                rows.append(
                    {
                        "page_url": page_url,
                        "image_url": f"https://digits.example.org/img/{int(i)}.png",
                        "image": png(images[i]),
                    }
                )
            pages += 1
    schema = pa.schema(
        [("page_url", pa.string()), ("image_url", pa.string()), ("image", pa.binary())]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return pages


def write_test_folder(images, labels, test, folder: Path) -> None:
    """The held-out digits as <folder>/<digit>/<index>.png: one group per class."""
    for i in test:
        target = folder / str(labels[i]) / f"{int(i):04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png(images[i]))


def pixel_features(pixels: np.ndarray) -> np.ndarray:
    """8x8 grayscale pixels in [0, 1] (area downsampling): the digits' native resolution."""
    from PIL import Image

    grey = [
        np.asarray(Image.fromarray(p).convert("L").resize((8, 8), Image.Resampling.BOX), np.float64)
        for p in np.asarray(pixels, np.uint8)
    ]
    return np.stack(grey).reshape(len(grey), -1) / 255.0


def same_class_quantile(features: np.ndarray, labels: np.ndarray, q: float = 0.99) -> float:
    """The q-quantile of cosine similarity between distinct same-class images."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = []
    for digit in np.unique(labels):
        block = f[labels == digit]
        s = block @ block.T
        sims.append(s[np.triu_indices(len(block), k=1)])
    return float(np.quantile(np.concatenate(sims), q))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/digits"))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--test-per-class", type=int, default=30)
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from pairmill.train import evaluate as ev
    from pairmill.train.loop import TrainConfig, load_checkpoint, train
    from pipelines import build_pairs

    torch.set_num_threads(1)  # a shared 2-core machine: more threads are far slower
    out: Path = args.out
    started = time.perf_counter()
    images, labels = digit_images()
    train_idx, test_idx = split(labels, args.test_per_class, args.seed)
    pages = write_crawl(images, labels, train_idx, out / "crawl" / "crawl.parquet", args.seed)
    write_test_folder(images, labels, test_idx, out / "test")
    run_dir = out / "run"
    argv_build = [str(out / "crawl" / "crawl.parquet"), "--out", str(run_dir), "--encoder"]
    argv_build += ["tiny", "--device", "cpu", "--low", "-1", "--high", "0.999", "--min-side"]
    argv_build += ["8", "--overwrite"]
    result = build_pairs.run(argv_build)
    counts = result.pairmill_manifest["counts"]
    print(
        f"corpus: {pages} pages, {counts.get('images')} images, {counts.get('kept_pairs')} "
        f"pairs kept of {counts.get('candidate_pairs')} ({time.perf_counter() - started:.0f}s)",
        flush=True,
    )

    timings = {}
    for objective in ("pairs", "reconstruct"):
        t0 = time.perf_counter()
        config = TrainConfig(
            shards=[str(run_dir)], out=str(out / f"ckpt-{objective}"), model="tiny",
            image_size=32, batch_size=args.batch_size, steps=args.steps, lr=args.lr,
            objective=objective, device="cpu", seed=args.seed, shuffle_buffer=2000,
            log_every=max(1, args.steps // 5), ckpt_every=args.steps,
        )  # fmt: skip
        summary = train(config, echo=lambda line, o=objective: print(f"  [{o}] {line}", flush=True))
        timings[objective] = time.perf_counter() - t0
        print(f"trained {objective}: loss {summary['loss']:.4f} in {timings[objective]:.0f}s")

    # Per-space copy thresholds from the held-out reals (see the module docstring).
    tests = ev.load_test_set(out / "test")
    test_labels = np.array([int(g) for g in tests.groups])
    from pairmill.data import decode_pixels

    test_pixels = np.stack([decode_pixels(b, 32) for b in tests.images])
    ckpt_info = load_checkpoint(out / "ckpt-pairs" / "latest.pt")["encoder"]
    enc = ev.embed_bytes([ev.png_bytes(x) for x in test_pixels], ckpt_info, None, "cpu")
    enc_cut = same_class_quantile(enc, test_labels)
    pix_cut = same_class_quantile(pixel_features(test_pixels), test_labels)
    print(f"copy thresholds (99th pct same-class): encoder {enc_cut:.4f}, pixels {pix_cut:.4f}")

    extra = {"pixels8": pixel_features}
    cuts = {"pixels8": pix_cut}
    results = {}
    for objective in ("pairs", "reconstruct"):
        t0 = time.perf_counter()
        config = ev.EvalConfig(
            shots=1, guidance=tuple(args.guidance), steps=args.sample_steps, sampler="ddim",
            seed=args.seed, copy_threshold=enc_cut,
        )  # fmt: skip
        res = ev.evaluate(out / f"ckpt-{objective}" / "latest.pt", tests, config, None, extra, cuts)
        results[objective] = res
        for g in args.guidance:
            ev.sample_grid_png(res, g, out / f"grid-{objective}-g{g:g}.png", n=10)
        print(f"evaluated {objective} in {time.perf_counter() - t0:.0f}s", flush=True)

    # The copy oracle: every sample is its own conditioning image.
    def copies(_emb, cond_pixels, n, _g, _s):
        return np.repeat(cond_pixels[:, None], n, axis=1)

    config = ev.EvalConfig(shots=1, guidance=(0.0,), seed=args.seed, copy_threshold=enc_cut)
    oracle = ev.evaluate(out / "ckpt-pairs" / "latest.pt", tests, config, copies, extra, cuts)

    table = [("pairs", r) for r in results["pairs"].rows]
    table += [("reconstruct", r) for r in results["reconstruct"].rows]
    table += [("copy oracle", r) for r in oracle.rows]
    head = f"{'model':<12} {'g':>4} | {'FID':>8} {'prec':>5} {'rec':>5} {'copy':>5} {'align':>5}"
    n, k = oracle.rows[0]["n"], oracle.rows[0]["k"]
    print(f"\none-shot on held-out digits: N={n} test images, K={k} (1 per class), N/K each")
    print(f"steps {args.steps} x batch {args.batch_size} each; DDIM {args.sample_steps} steps")
    for space, suffix in (
        ("encoder:tiny (random weights, not semantic)", ""),
        ("pixels: 8x8 grayscale (native digit space)", "@pixels8"),
    ):
        print(f"\n[{space}]")
        print(head)
        for name, r in table:
            print(
                f"{name:<12} {r['guidance']:>4g} | {r['fid' + suffix]:>8.4g} "
                f"{r['precision' + suffix]:>5.3f} {r['recall' + suffix]:>5.3f} "
                f"{r['copy_rate' + suffix]:>5.3f} {r['alignment' + suffix]:>5.3f}"
            )
    report = {
        "rows": {name: [r for m, r in table if m == name] for name in dict(table)},
        "thresholds": {"encoder": enc_cut, "pixels8": pix_cut},
        "train_seconds": timings,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "total_seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    ev.plot_precision_recall(results["pairs"].rows, out / "pr-pairs.png")
    print(f"\ngrids: {sorted(str(p) for p in out.glob('grid-*.png'))}")
    print(f"results: {out / 'results.json'}; total {report['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
