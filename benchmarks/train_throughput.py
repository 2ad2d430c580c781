"""How close does `pairmill train` come to the bare model update loop?

Builds a pair corpus from the bundled real-photo sample (tiny encoder, random weights;
`--store-tokens` for a token model), then in the same process times:

  bare      model + Adam + EMA on tensors already in memory (same model, batch, image
            size and token shapes): the ceiling for this model on this device
  trainer   `pairmill.train.loop.train` on the shards: reading, decoding, random crops,
            side flips, the same updates and EMA, progress lines and one checkpoint

and prints steps/s, images/s and trainer / bare. On CUDA both use bf16 autocast and
channels-last, as the trainer does. The first `--warmup` steps of each are not timed.

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --model tiny --steps 300
    python benchmarks/train_throughput.py --model B --image-size 64 --batch-size 64 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path


def make_run(directory: Path, store_tokens: bool, token_grid: int) -> Path:
    from pairmill.sample import make_sample_crawl
    from pipelines import build_pairs

    crawl = make_sample_crawl(directory / "crawl", pages=24, images_per_page=8)
    run = directory / "run"
    argv = [str(crawl), "--out", str(run), "--encoder", "tiny", "--weights", "random"]
    argv += ["--device", "cpu", "--low", "-1", "--high", "1"]
    if store_tokens:
        argv += ["--store-tokens", "--token-grid", str(token_grid)]
    build_pairs.run(argv)
    return run


def bare_loop(config, model_cfg, token_shape, steps: int, warmup: int) -> float:
    """Seconds for `steps` updates of the same model on in-memory tensors."""
    import torch

    from pairmill.train.diffusion import Schedule, diffusion_loss
    from pairmill.train.loop import resolve_train_device, update_ema
    from pairmill.train.model import build_model

    device = resolve_train_device(config.device)
    cuda = device.type == "cuda"
    layout = torch.channels_last if cuda else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device, memory_format=layout).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas)
    schedule = Schedule(image_size=config.image_size)
    b, s = config.batch_size, config.image_size
    x = (torch.rand(b, 3, s, s) * 2 - 1).to(device, memory_format=layout)
    cond = torch.randn(b, model_cfg.cond_dim, device=device)
    tokens = torch.randn(b, *token_shape, device=device) if token_shape else None
    kwargs = {"tokens": tokens} if tokens is not None else {}
    started = None
    for step in range(warmup + steps):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        t = torch.rand(b, device=device)
        eps = torch.randn(x.shape, device=device).contiguous(memory_format=layout)
        drop = torch.rand(b, device=device) < config.cond_drop
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = diffusion_loss(model, schedule, x, cond, t, eps, drop, **kwargs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, config.ema, step)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--store-tokens", action="store_true")
    p.add_argument("--token-grid", type=int, default=4)
    p.add_argument("--decode-workers", type=int, default=0, help="0: the trainer's default")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import logging

    import torch

    from pairmill.train import loop

    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = make_run(tmp, args.store_tokens, args.token_grid)
        config = loop.TrainConfig(
            shards=[str(run)], out=str(tmp / "ckpt"), model=args.model,
            image_size=args.image_size, batch_size=args.batch_size,
            steps=args.warmup + args.steps, device=args.device, shuffle_buffer=256,
            log_every=args.warmup, ckpt_every=10**9, decode_workers=args.decode_workers,
        )  # fmt: skip
        marks = {}

        def echo(line: str) -> None:
            # "step N/M ..." lines mark the end of the warm-up and of the run.
            if line.startswith("step "):
                step = int(line.split()[1].split("/")[0])
                if args.device != "cpu" and torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks.setdefault(step, time.perf_counter())

        loop.train(config, echo=echo)
        trainer_s = marks[args.warmup + args.steps] - marks[args.warmup]
        ckpt = loop.load_checkpoint(tmp / "ckpt" / "latest.pt")
        from pairmill.train.model import ModelConfig

        model_cfg = ModelConfig(**ckpt["model_config"])
        count = ckpt["encoder"].get("token_count") if model_cfg.token_dim else None
        token_shape = (count, model_cfg.token_dim) if count else None
        bare_s = bare_loop(config, model_cfg, token_shape, args.steps, args.warmup)

    device = str(loop.resolve_train_device(args.device))
    result = {
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "tokens": token_shape,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "bare_steps_per_s": round(args.steps / bare_s, 2),
        "trainer_steps_per_s": round(args.steps / trainer_s, 2),
        "trainer_images_per_s": round(args.steps * args.batch_size / trainer_s, 1),
        "ratio": round(bare_s / trainer_s, 3),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    tokens = f", cross-attention to {token_shape[0]} tokens" if token_shape else ""
    print(
        f"model {args.model}{tokens}, {args.image_size}px, batch {args.batch_size}, on "
        f"{device} ({result['torch_threads']} threads), {args.steps} timed steps"
    )
    print(f"bare update loop   {result['bare_steps_per_s']:8.2f} steps/s")
    print(
        f"pairmill train     {result['trainer_steps_per_s']:8.2f} steps/s "
        f"({result['trainer_images_per_s']:.1f} images/s)"
    )
    print(f"ratio (trainer / bare) {result['ratio']:.3f}")


if __name__ == "__main__":
    main()
