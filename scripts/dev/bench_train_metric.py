"""Benchmark: the tiny metric trained 3 epochs on the SYNTHETIC toy set; test SRCC and wall time.

Target: test SRCC >= 0.8 within 5 minutes on a 2-core CPU.

    .venv/bin/python scripts/dev/bench_train_metric.py [--out bench_out] [--threads 1] [--crop 96] [--lr 1e-4]
        [--init auto|random|DIR] [--seed 0] [--crops-per-image 1] [--lr-schedule step|cosine] [--warmup-steps 0]

``--seed`` seeds the training and also draws the toy set, hence which photos are tested:
results move a lot between seeds; compare configurations over several.

The tiny model starts from the bundled SSIM-pretrained weights (``epban.weights``) unless
``--init random``; scripts/pretrain_tiny.py made them.

On a shared CPU, one intra-op thread is much faster than two (OpenMP threads spin when
the cores are oversubscribed): hence the default ``--threads 1``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out/train_metric")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="toy HR size")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="auto", help="auto (the bundled tiny-ssim weights), random, or a model directory")
    p.add_argument("--crops-per-image", type=int, default=1, help="visits of each training pair per epoch")
    p.add_argument("--lr-schedule", default="step", choices=["step", "cosine"])
    p.add_argument("--warmup-steps", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from epban.metric import evaluate_metric, make_toy_dataset, train_metric

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    manifest = make_toy_dataset(out / "toy", seed=args.seed, size=args.size, quiet=True)
    t1 = time.perf_counter()
    best = train_metric(manifest, config="tiny", epochs=args.epochs, out=out / "run", batch_size=args.batch_size,
                        lr=args.lr, crop=args.crop, seed=args.seed, num_workers=0, quiet=True, init=args.init,
                        crops_per_image=args.crops_per_image, lr_schedule=args.lr_schedule,
                        warmup_steps=args.warmup_steps)
    t2 = time.perf_counter()
    report = evaluate_metric(manifest, weights=best, split="test", out=out / "eval", num_workers=0, quiet=True)
    t3 = time.perf_counter()
    result = {
        "test_srcc": report["srcc"], "test_plcc": report["plcc"], "test_krcc": report["krcc"],
        "test_rmse": report["rmse"], "n_test": report["n"],
        "seconds": {"toy_set": round(t1 - t0, 1), "train": round(t2 - t1, 1), "eval": round(t3 - t2, 1),
                    "total": round(t3 - t0, 1)},
        "settings": vars(args), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average": os.getloadavg(), "target": "test SRCC >= 0.8 within 300 s",
        "met": bool(report["srcc"] >= 0.8 and t3 - t0 <= 300),
    }
    print(json.dumps(result, indent=2))
    print("note: SYNTHETIC scores (toy set): this measures the pipeline, not agreement with people", file=sys.stderr)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
