"""Pretrain the tiny EfficientPBAN on procedural dead-leaves pairs to predict SSIM.

Why: the tiny preset has no ImageNet backbone to start from, and a randomly initialised
two-stream network needs far more than a few CPU epochs to learn to compare its SR and HR
streams. This script gives it a starting point the way ImageNet gives the full model one:
on data with no photo of the toy set in it, and with a target (SSIM of the pair) that is
not the toy set's score formula. The bundled weights were made in four stages:

    python scripts/pretrain_tiny.py --minutes 22 --out /tmp/stage1
    python scripts/pretrain_tiny.py --minutes 15 --lr 5e-4 --seed 1 --init /tmp/stage1 --out /tmp/stage2
    python scripts/pretrain_tiny.py --init /tmp/stage2 --pairs 10000 --lr 3e-4 --minutes 14 --seed 3 --out /tmp/stage3
    python scripts/pretrain_tiny.py --init /tmp/stage3 --pairs 10000 --lr 3e-4 --minutes 14 --seed 4 \
        --out epban/weights/tiny-ssim

Their ``pretrain.json`` records every stage (data, steps, learning rate, validation SRCC
against SSIM). The fit to SSIM is a guide, not the goal: what counts is how well the
weights fine-tune on scored pairs (``scripts/dev/bench_train_metric.py``), and more stages
or a closer SSIM fit stopped helping there.

``--images scenes`` pretrains on ``leaf_scene`` instead (photo-like variety between
images) and ``--per-image K`` degrades each image K times; such weights predict SSIM on
photos better but fine-tune worse on the toy set. ``--images leaves --per-image 1`` (the
defaults) reproduce the bundled weights' data.

The result is stored in float16 and is what ``train-metric --config tiny`` starts from by
default (``--init random`` to start from scratch).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def make_pairs(n: int, size: int, seed: int, desc: str, images: str = "leaves", per_image: int = 1):
    """``n`` (sr, hr) pairs; each procedural HR image is degraded ``per_image`` times."""
    from tqdm import tqdm

    from epban.data.procedural import GENERATORS, degrade

    rng = np.random.default_rng(seed)
    sr, hr = [], []
    with tqdm(total=n, desc=desc, unit="pair", file=sys.stderr) as bar:
        while len(sr) < n:
            image = GENERATORS[images](size, rng)
            for _ in range(min(per_image, n - len(sr))):
                a, b, _ = degrade(image, rng)
                sr.append(a)
                hr.append(b)
                bar.update()
    to_t = lambda xs: torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return to_t(sr), to_t(hr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="epban/weights/tiny-ssim")
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--val-pairs", type=int, default=300)
    p.add_argument("--images", default="leaves", choices=["leaves", "scenes"],
                   help="procedural HR images: leaves (epban.data.procedural.dead_leaves, the bundled weights') "
                        "or scenes (leaf_scene)")
    p.add_argument("--per-image", type=int, default=1, help="degraded versions of each HR image")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="continue from these weights (a model directory) instead of random ones")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--toy", help="a toy manifest: also report zero-shot SRCC on its test split")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from scipy.stats import spearmanr

    import epban
    from epban.models.pban import EfficientPBAN, PBANConfig

    torch.manual_seed(args.seed)
    sr, hr = make_pairs(args.pairs, args.size, args.seed, "train pairs", args.images, args.per_image)
    vsr, vhr = make_pairs(args.val_pairs, args.size, args.seed + 1, "val pairs", args.images, args.per_image)
    with torch.no_grad():
        target = epban.ssim(sr, hr, data_range=1.0, reduction="none")
        vtarget = epban.ssim(vsr, vhr, data_range=1.0, reduction="none")
    mean, std = float(target.mean()), float(target.std())
    print(f"SSIM of the pairs: mean {mean:.3f}, std {std:.3f}", file=sys.stderr)

    model = EfficientPBAN(PBANConfig.tiny(score_range=(0.0, 1.0)))
    with torch.no_grad():  # the network predicts standardised SSIM; the output layer carries the scale
        model.out.bias.fill_(0.0)
        if args.init:  # earlier weights, their output (SSIM units, pretrain.json) back to standardised
            model = EfficientPBAN.from_checkpoint(args.init).float()
            before = json.loads((Path(args.init) / "pretrain.json").read_text())
            model.out.bias.sub_(before["mean"]).div_(before["std"])
            model.out.weight.div_(before["std"])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)

    def batch(idx):
        top, left = torch.randint(0, args.size - args.crop + 1, (2,), generator=gen).tolist()
        s = sr[idx, :, top:top + args.crop, left:left + args.crop]
        h = hr[idx, :, top:top + args.crop, left:left + args.crop]
        if torch.rand((), generator=gen) < 0.5:
            s, h = s.flip(-1), h.flip(-1)
        return s, h, (target[idx] - mean) / std

    def validate():
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(vsr[i:i + 50], vhr[i:i + 50]) for i in range(0, len(vtarget), 50)])
        model.train()
        return spearmanr(pred, vtarget)[0]

    budget = args.minutes * 60
    t0, step, losses = time.perf_counter(), 0, []
    model.train()
    while time.perf_counter() - t0 < budget:
        perm = torch.randperm(len(target), generator=gen)
        for i in range(0, len(perm) - args.batch_size + 1, args.batch_size):
            elapsed = time.perf_counter() - t0
            if elapsed >= budget:
                break
            for g in opt.param_groups:  # cosine decay over the time budget
                g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
            s, h, y = batch(perm[i:i + args.batch_size])
            loss = F.mse_loss(model(s, h, check_finite=False), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 100 == 0:
                print(f"step {step} ({elapsed / 60:.1f} min): loss {np.mean(losses[-100:]):.4f}  "
                      f"val SRCC {validate():.4f}", file=sys.stderr, flush=True)
    final_srcc = float(validate())
    model.eval()
    print(f"done: {step} steps, val SRCC vs SSIM {final_srcc:.4f}", file=sys.stderr)
    with torch.no_grad():  # predictions in SSIM units
        model.out.weight.mul_(std)
        model.out.bias.mul_(std).add_(mean)
    model.half()
    out = model.save_pretrained(args.out)
    import platform

    data = {"scenes": "leaf_scene (photo-like dead-leaves scenes)", "leaves": "dead_leaves"}[args.images]
    stage = {
        "command": "python scripts/pretrain_tiny.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": f"{args.pairs} pairs ({args.per_image} degraded version(s) per HR image), {args.size} px, "
                f"seed {args.seed}: epban.data.procedural {data} with random toy-set degradations",
        "steps": step, "batch_size": args.batch_size, "crop": args.crop, "lr": args.lr, "minutes": args.minutes,
        "val_srcc_vs_ssim": round(final_srcc, 4),
    }
    stages = []
    if args.init:  # the earlier stages this one continues
        before = json.loads((Path(args.init) / "pretrain.json").read_text())
        stages = before.get("stages") or [{k: before.get(k) for k in ("data", "steps", "lr", "val_srcc_vs_ssim")}]
    provenance = {
        "target": "ssim", "mean": mean, "std": std,
        "note": "outputs are SSIM estimates: the out layer is in SSIM units; mean/std are those of the last "
                "stage's targets",
        "stages": stages + [stage],
        "torch": torch.__version__, "python": platform.python_version(),
    }
    if args.toy:
        from epban.metric import evaluate_metric

        report = evaluate_metric(args.toy, weights=out, split="test", quiet=True, num_workers=0)
        stage["zero_shot_toy_test_srcc"] = round(report["srcc"], 4)
        print(f"zero-shot on {args.toy} (test): SRCC {report['srcc']:.4f}", file=sys.stderr)
    (Path(out) / "pretrain.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"saved {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
