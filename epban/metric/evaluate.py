"""Scoring a manifest split with a metric, the IQA report, and its scatter plot."""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from epban.data.dataset import PairDataset, SizeGroupedBatchSampler
from epban.data.manifest import ManifestError, Sample, check_images, load_manifest, select_split
from epban.data.toy import is_toy
from epban.data.transforms import DataPolicy, PairedEvalTransform
from epban.iqa_stats import iqa_report, logistic4
from epban.training import distributed
from epban.training.checkpoint import TRAINING_INFO_FILE
from epban.training.records import json_safe, write_json
from epban.training.run_folder import check_writable, make_out

MIN_EVAL_SIZE = 32


def default_workers(device: torch.device) -> int:
    """Decoding is cheap next to the metric on a CPU; keep cores for compute there."""
    cpus = os.cpu_count() or 1
    return min(4, cpus // 2) if device.type == "cuda" else min(4, max(0, cpus - 2))


def no_sigint_in_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C goes to the whole process group; the main process
    saves and stops, so its workers must not die first."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def fmt_metric(value, digits: int = 4) -> str:
    """A correlation or error for people: ``n/a`` when undefined (None or NaN)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


@torch.no_grad()
def predict(model, samples: list[Sample], *, eval_size: int | None, batch_size: int = 8,
            device: torch.device | None = None, num_workers: int = 0,
            ctx: distributed.DistContext | None = None, sizes=None, progress: bool = False,
            check_finite: bool = True) -> np.ndarray:
    """The model's scores for ``samples`` in manifest order; under DDP each rank scores a shard
    and every rank returns all of them. ``check_finite``: a non-finite score is a ValueError
    naming its manifest row (training checks for itself: there, it means divergence)."""
    ctx = ctx or distributed.DistContext(device=device or torch.device("cpu"))
    device = device or ctx.device
    if sizes is None:
        sizes = check_images(samples, MIN_EVAL_SIZE if eval_size is None else 1)
    if eval_size is not None:
        sizes = [(eval_size, eval_size)] * len(samples)
    dataset = PairDataset(samples, PairedEvalTransform(eval_size))
    sampler = SizeGroupedBatchSampler(sizes, batch_size, rank=ctx.rank, world_size=ctx.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda",
                        worker_init_fn=no_sigint_in_worker if num_workers else None,
                        generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    indices, preds = [], []
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="scoring", unit="batch", leave=False, file=sys.stderr)
    for batch in iterator:
        sr = batch["sr"].to(device, non_blocking=True)
        hr = batch["hr"].to(device, non_blocking=True)
        preds.append(model(sr, hr, check_finite=False).float().cpu())
        indices.append(batch["index"])
    model.train(was_training)
    local = (torch.cat(indices).tolist() if indices else [], torch.cat(preds).tolist() if preds else [])
    out = np.full(len(samples), np.nan)
    for idx, val in distributed.all_gather_objects(ctx, local):
        out[idx] = val
    if check_finite and not np.isfinite(out).all():
        bad = int(np.flatnonzero(~np.isfinite(out))[0])
        raise ValueError(f"{samples[bad].where}: the metric's score is not finite ({out[bad]})")
    return out


def build_report(samples: list[Sample], preds: np.ndarray) -> dict:
    """``iqa_report`` of all samples, plus ``per_method`` when the samples name their method."""
    scores = np.array([s.score for s in samples])
    report = iqa_report(preds, scores)
    methods = sorted({s.method for s in samples if s.method})
    if methods:
        per = {}
        for m in methods:
            mask = np.array([s.method == m for s in samples])
            r = iqa_report(preds[mask], scores[mask])
            r.pop("logistic")
            r["mean_score"], r["mean_pred"] = float(scores[mask].mean()), float(preds[mask].mean())
            per[m] = r
        report["per_method"] = per
    return report


def scatter_plot(path: Path, samples: list[Sample], preds: np.ndarray, report: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.array([s.score for s in samples])
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=110)
    methods = sorted({s.method or "" for s in samples})
    cmap = plt.get_cmap("tab20")
    for i, m in enumerate(methods):
        mask = np.array([(s.method or "") == m for s in samples])
        ax.scatter(preds[mask], scores[mask], s=14, alpha=0.8, color=cmap(i % 20), label=m or None)
    if report.get("logistic"):
        xs = np.linspace(preds.min(), preds.max(), 200)
        ax.plot(xs, logistic4(xs, *report["logistic"]["params"]), color="black", lw=1.5, label="logistic fit")
    ax.set_xlabel("predicted score")
    ax.set_ylabel("score (manifest)")
    fmt = lambda v: fmt_metric(v, 3)  # noqa: E731
    ax.set_title(f"{title}\nSRCC {fmt(report['srcc'])}  PLCC {fmt(report['plcc'])}  "
                 f"KRCC {fmt(report['krcc'])}  n={report['n']}", fontsize=9)
    if len(methods) > 1 or report.get("logistic"):
        ax.legend(fontsize=6, ncol=2, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def resolve_eval_size(weights: Path, model, eval_size) -> int | None:
    """``"auto"``: the run's own policy (training.json beside the weights), else the authors'
    512x512 for the official preset, else full resolution."""
    if eval_size != "auto":
        return None if eval_size in (None, 0) else int(eval_size)
    info = Path(weights) / TRAINING_INFO_FILE
    if info.is_file():
        policy = json.loads(info.read_text()).get("data_policy")
        if policy:
            return DataPolicy.from_dict(policy).eval_size
    return 512 if model.config.name == "official" else None


def evaluate_metric(data, *, weights, split: str | None = "test", out=None, device=None, root=None,
                    batch_size: int = 8, eval_size="auto", preset: str | None = None,
                    num_workers: int | None = None, quiet: bool = False) -> dict:
    """Score ``split`` of the manifest ``data`` with the metric at ``weights``; return the report.

    ``weights``: a run's ``best``/``last`` directory, any ``save_pretrained`` directory, or
    the authors' ``.pth`` (``preset="official"`` for their normalisation). With ``out``,
    writes ``report.json``, ``predictions.csv`` and ``scatter.png`` there. Runs under
    ``torchrun`` too (each rank scores a shard; rank 0 writes).
    """
    from epban.models.pban import EfficientPBAN

    samples = select_split(load_manifest(data, root=root), split, data)
    if out is not None:
        check_writable(out)  # before the scoring: an unusable --out stops the evaluation at once
    ctx = distributed.setup(device)
    try:
        try:
            model = EfficientPBAN.from_checkpoint(weights, preset=preset) if preset else \
                EfficientPBAN.from_checkpoint(weights)
        except FileNotFoundError as exc:
            raise ManifestError(str(exc)) from None
        model = model.to(ctx.device).eval()
        size = resolve_eval_size(Path(weights), model, eval_size)
        workers = default_workers(ctx.device) if num_workers is None else num_workers
        preds = predict(model, samples, eval_size=size, batch_size=batch_size, ctx=ctx, num_workers=workers,
                        progress=not quiet and ctx.is_main)
        report = build_report(samples, preds)
        synthetic = is_toy(data)
        report.update({"split": split or "all", "manifest": str(data), "weights": str(weights),
                       "eval_size": size, "synthetic_scores": synthetic})
        report = json_safe(report)
        if out is not None and ctx.is_main:
            out = make_out(out)
            title = f"{Path(str(weights)).name} on {Path(str(data)).name} [{split or 'all'}]"
            if synthetic:
                title += " (SYNTHETIC scores)"
            try:
                _write_predictions(out / "predictions.csv", samples, preds)
                scatter_plot(out / "scatter.png", samples, preds, report, title)
                write_json(out / "report.json", report)  # last: its presence means the evaluation completed
            except OSError as exc:
                raise ValueError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
        return report
    finally:
        distributed.cleanup(ctx)


def _write_predictions(path: Path, samples: list[Sample], preds: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sr_path", "hr_path", "score", "method", "prediction"])
        for s, p in zip(samples, preds):
            writer.writerow([s.sr_path, s.hr_path, s.score, s.method or "", f"{p:.6f}"])
    os.replace(tmp, path)
