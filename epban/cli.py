"""The ``epban`` command: ``score`` and ``info`` here; ``make-dataset``, ``train-metric`` and
``eval-metric`` from ``epban.metric.cli``; ``train-sr`` from ``epban.sr.cli``.

This module dispatches; the command modules it imports import nothing from it. Every user
error (a bad argument, file or checkpoint) is one line on stderr and exit status 2; Ctrl-C
during a command is one line and exit status 130.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from epban.cli_errors import CLIError, one_line
from epban.cli_options import add_threads_option, device_arg, int_at_least, set_threads
from epban.metric import cli as metric_cli
from epban.sr import cli as sr_cli

SSIM_MIN_SIZE = 11  # the Gaussian window
PROGRESS_MIN_IMAGES = 2  # a progress bar (on a terminal) from this many images up


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (``epban score: error: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass
class _Pair:
    name: str
    sr: Path
    hr: Path
    size: tuple[int, int] = (0, 0)


@dataclass
class _Metric:
    model: object
    label: str
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- score
def _pairs(sr: Path, hr: Path, skip_bad: bool, skipped: list[str]) -> list[_Pair]:
    from epban.imageio import list_images

    if sr.is_file() and hr.is_file():
        return [_Pair(sr.name, sr, hr)]
    if sr.is_dir() and hr.is_dir():
        sr_files = {p.name: p for p in list_images(sr)}
        hr_files = {p.name: p for p in list_images(hr)}
        if not sr_files:
            raise CLIError(f"{sr}: no images found")
        missing = sorted(set(sr_files) - set(hr_files))
        if missing and not skip_bad:
            raise CLIError(f"{hr / missing[0]}: missing HR image for {sr / missing[0]}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        skipped += [f"{hr / name}: missing HR image for {sr / name}" for name in missing]
        unpaired = sorted(set(hr_files) - set(sr_files))
        if unpaired:
            print(f"note: {len(unpaired)} HR image(s) in {hr} have no SR counterpart in {sr}, not scored: "
                  + ", ".join(unpaired[:3]) + (", ..." if len(unpaired) > 3 else ""), file=sys.stderr)
        return [_Pair(name, sr_files[name], hr_files[name]) for name in sorted(sr_files) if name in hr_files]
    for p in (sr, hr):
        if not p.exists():
            raise CLIError(f"{p}: no such file or directory")
    raise CLIError(f"SR and HR must both be files or both be directories: {sr}, {hr}")


def _load_metric(text: str | None, device: torch.device) -> _Metric | None:
    from epban.models.pban import EfficientPBAN

    if text is None:
        return None
    from epban import weights

    try:
        path, label = weights.resolve(text), text
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    try:
        model = EfficientPBAN.from_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        raise one_line(exc) from None
    notes = []
    about = path / "pretrain.json" if path.is_dir() else None
    if about is not None and about.is_file():
        try:
            note = json.loads(about.read_text()).get("note")
        except (ValueError, OSError):
            note = None
        if note:
            notes.append(f"note: {label}: {note}")
    return _Metric(model.eval().to(device), label, notes)


def _check_csv_target(text: str | None, sr: Path, hr: Path) -> Path | None:
    """``--csv``: refused before any work when its folder is missing, it names a folder, or it
    names an existing image (an SR or HR input or any other), which the table would overwrite."""
    from epban.imageio import IMAGE_SUFFIXES

    if text is None:
        return None
    path = Path(text)
    if path.is_dir():
        raise CLIError(f"--csv {path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise CLIError(f"--csv {path}: folder {path.parent} does not exist")
    if path.exists() and (path.resolve().suffix.lower() in IMAGE_SUFFIXES
                          or any(p.is_file() and os.path.samefile(path, p) for p in (sr, hr))):
        raise CLIError(f"--csv {path}: is an image (an input?) that the table would overwrite; give another name")
    return path


def _probe(pairs: list[_Pair], min_size: int, skip_bad: bool, skipped: list[str]) -> list[_Pair]:
    """The pairs whose files open as images of one size, at least ``min_size`` square.

    A bad pair stops the command (naming the file) before any scoring, or is skipped with
    ``--skip-bad``.
    """
    from epban.imageio import ImageReadError, probe_image

    good = []
    for pair in pairs:
        try:
            sr_size, hr_size = probe_image(pair.sr), probe_image(pair.hr)
            if sr_size != hr_size:
                raise ImageReadError(f"{pair.sr}: size {sr_size[1]}x{sr_size[0]} differs from its HR "
                                     f"{pair.hr} ({hr_size[1]}x{hr_size[0]})")
            if min(sr_size) < min_size:
                raise ImageReadError(f"{pair.sr}: {sr_size[1]}x{sr_size[0]} is too small; at least "
                                     f"{min_size}x{min_size} is needed")
        except ImageReadError as exc:
            if not skip_bad:
                raise CLIError(f"{exc} (--skip-bad skips such files)") from None
            skipped.append(str(exc))
            continue
        pair.size = sr_size
        good.append(pair)
    return good


def _batches(pairs: list[_Pair], batch_size: int):
    """Runs of consecutive pairs of one size, at most ``batch_size`` long."""
    batch: list[_Pair] = []
    for pair in pairs:
        if batch and (len(batch) == batch_size or pair.size != batch[0].size):
            yield batch
            batch = []
        batch.append(pair)
    if batch:
        yield batch


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="image", desc="scoring", file=sys.stderr, leave=False)


def cmd_score(args) -> int:
    from epban.imageio import ImageReadError, read_image
    from epban.models.pban import MIN_INPUT_SIZE
    from epban.ops.ssim import ssim

    device = torch.device(args.device)
    csv_path = _check_csv_target(args.csv, Path(args.sr), Path(args.hr))
    skipped: list[str] = []
    pairs = _pairs(Path(args.sr), Path(args.hr), args.skip_bad, skipped)
    metric = _load_metric(args.weights, device)
    if metric is None:
        print("note: no metric given (--weights NAME|FOLDER|FILE): SSIM and PSNR only", file=sys.stderr)
    for note in metric.notes if metric else []:
        print(note, file=sys.stderr)
    pairs = _probe(pairs, MIN_INPUT_SIZE if metric else SSIM_MIN_SIZE, args.skip_bad, skipped)
    for problem in skipped:
        print(f"skipped: {problem}", file=sys.stderr)

    rows = []
    bar = _progress(len(pairs), sys.stderr.isatty() and len(pairs) >= PROGRESS_MIN_IMAGES)
    with torch.no_grad():
        for batch in _batches(pairs, args.batch_size):
            images, kept = [], []
            for pair in batch:
                try:
                    images.append((read_image(pair.sr), read_image(pair.hr)))
                    kept.append(pair)
                except ImageReadError as exc:
                    if not args.skip_bad:
                        raise CLIError(f"{exc} (--skip-bad skips such files)") from None
                    skipped.append(str(exc))
                    print(f"skipped: {exc}", file=sys.stderr)
            if bar is not None:
                bar.update(len(batch))
            if not kept:
                continue
            sr = torch.stack([s for s, _ in images]).to(device)
            hr = torch.stack([h for _, h in images]).to(device)
            where = str(kept[0].sr) + (f" (a batch of {len(kept)} from it)" if len(kept) > 1 else "")
            try:
                scores = metric.model(sr, hr).float().cpu().tolist() if metric else [None] * len(kept)
                ssims = ssim(sr, hr, reduction="none").float().cpu().tolist()
            except ValueError as exc:
                raise CLIError(f"{where}: {exc}") from None
            mse = torch.mean((sr.float() - hr.float()) ** 2, dim=(1, 2, 3)).cpu().tolist()
            for pair, score, s, m in zip(kept, scores, ssims, mse):
                psnr = math.inf if m == 0 else 10 * math.log10(1.0 / m)
                rows.append({"image": pair.name, "pban": score, "ssim": s, "psnr": psnr})
    if bar is not None:
        bar.close()
    if not rows:
        raise CLIError("no image pair could be scored" + (f" ({len(skipped)} skipped)" if skipped else ""))

    _print_table(rows, metric)
    if skipped:
        print(f"skipped {len(skipped)} file(s); see the messages above", file=sys.stderr)
    if csv_path is not None:
        fields = ["image"] + (["pban"] if metric else []) + ["ssim", "psnr"]
        try:
            with open(csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
        except OSError as exc:
            raise CLIError(f"--csv {csv_path}: cannot write ({exc.strerror or exc})") from None
        print(f"wrote {csv_path}")
    return 0


def _print_table(rows: list[dict], metric: _Metric | None) -> None:
    n = len(rows)
    mean = {key: sum(r[key] for r in rows) / n for key in ("ssim", "psnr")}
    if metric:
        mean["pban"] = sum(r["pban"] for r in rows) / n
    names = [r["image"] for r in rows] + [f"mean of {n}"]
    width = max(len("image"), *(len(name) for name in names))
    head = f"{'image':{width}s}  " + (f"{'PBAN':>9s}  " if metric else "") + f"{'SSIM':>7s}  {'PSNR(dB)':>8s}"
    print(head)
    for name, r in zip(names, rows + [mean]):
        if name.startswith("mean of"):
            print("-" * len(head))
        print(f"{name:{width}s}  " + (f"{r['pban']:9.4f}  " if metric else "") + f"{r['ssim']:7.4f}  {r['psnr']:8.2f}")
    if metric:
        lo, hi = metric.model.score_range
        print(f"PBAN ({metric.label}): higher is better; trained on scores in [{lo:g}, {hi:g}] "
              "(a score may fall outside)")
    print("SSIM: higher is better, at most 1.  PSNR: higher is better, in dB (inf: identical images)")


# ----------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    from epban.info import info

    print(info(as_text=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="epban", description="Efficient-PBAN perceptual quality metric for super-resolution")
    sub = parser.add_subparsers(dest="command", required=True)  # its parsers are ArgumentParser too
    p = sub.add_parser("score", help="score SR images against their HR references (higher is better)")
    p.add_argument("sr", help="an SR image, or a directory of them")
    p.add_argument("hr", help="its HR reference, or a directory with the same file names")
    p.add_argument("--weights", metavar="NAME|FOLDER|FILE",
                   help="the metric: bundled weights by name (e.g. tiny-ssim), an epban checkpoint folder or "
                        "the authors' .pth file; without it, SSIM and PSNR only")
    p.add_argument("--csv", help="also write the per-image table to this CSV file (its folder must exist)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="image pairs per batch (default 8)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and report) unreadable, mismatched or missing files instead of stopping")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1 (default: cuda when available)")
    add_threads_option(p)
    p.set_defaults(func=cmd_score)
    p = sub.add_parser("info", help="versions and which backend serves each op")
    p.set_defaults(func=cmd_info)
    metric_cli.register(sub)
    sr_cli.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if getattr(args, "threads", None) is not None:
            set_threads(args.threads)
        return args.func(args) or 0
    except CLIError as exc:
        print(f"epban {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the training commands save their checkpoint and return 130 themselves
        print(f"epban {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests, notebooks)


if __name__ == "__main__":
    sys.exit(main())
