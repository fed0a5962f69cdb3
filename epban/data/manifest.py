"""Manifests: which SR image goes with which HR reference, its subjective score, its split.

Two formats are read:

- a CSV with a header ``sr_path,hr_path,score[,method][,split]``; paths relative to the
  CSV's folder (or absolute); lines starting with ``#`` are comments.
- the authors' list files (docs/architecture.md): one ``SR_NAME#SCORE#<unused>#HR_NAME`` per
  line, paths relative to ``<root>/SR_results/`` and ``<root>/HR/``, one file per split
  (``train.txt``, ``val.txt``, ``test.txt``).

Every problem is a ``ManifestError`` naming the manifest file and line.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

CSV_REQUIRED = ("sr_path", "hr_path", "score")
CSV_OPTIONAL = ("method", "split")
SPLITS = ("train", "val", "test")
LIST_SPLIT_FILES = {name: f"{name}.txt" for name in SPLITS}


class ManifestError(ValueError):
    """A manifest problem; the message starts with ``file:line:`` where a line is to blame."""


@dataclass(frozen=True)
class Sample:
    """One scored SR image and its reference."""

    sr_path: Path
    hr_path: Path
    score: float
    method: str | None
    split: str | None
    where: str  # "manifest:line", for error messages

    @property
    def name(self) -> str:
        return self.sr_path.name


def _score(text: str, where: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: score {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ManifestError(f"{where}: score {text!r} is not a finite number")
    return value


def _split(text: str | None, where: str) -> str | None:
    if text is None or text.strip() == "":
        return None
    value = text.strip().lower()
    if value not in SPLITS:
        raise ManifestError(f"{where}: split {text!r} is not one of {', '.join(SPLITS)}")
    return value


def read_csv_manifest(path: str | os.PathLike) -> list[Sample]:
    """Read a CSV manifest; see the module docstring for the columns."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc})") from None
    numbered = [(i, line) for i, line in enumerate(text.splitlines(), start=1)
                if line.strip() and not line.lstrip().startswith("#")]
    if not numbered:
        raise ManifestError(f"{path}: empty manifest (expected a header {','.join(CSV_REQUIRED)}[,method][,split])")
    rows = list(csv.reader([line for _, line in numbered]))
    header_line, header = numbered[0][0], [h.strip() for h in rows[0]]
    unknown = [h for h in header if h not in CSV_REQUIRED + CSV_OPTIONAL]
    missing = [h for h in CSV_REQUIRED if h not in header]
    if unknown or missing or len(set(header)) != len(header):
        problems = []
        if unknown:
            problems.append(f"unknown column(s) {', '.join(map(repr, unknown))}")
        if missing:
            problems.append(f"missing column(s) {', '.join(map(repr, missing))}")
        if len(set(header)) != len(header):
            problems.append("repeated column names")
        raise ManifestError(f"{path}:{header_line}: {'; '.join(problems)}; expected the columns "
                            f"{','.join(CSV_REQUIRED)} and optionally {','.join(CSV_OPTIONAL)}")
    base = path.parent
    samples = []
    for (line_no, _), row in zip(numbered[1:], rows[1:]):
        where = f"{path}:{line_no}"
        if len(row) != len(header):
            raise ManifestError(f"{where}: {len(row)} fields, the header has {len(header)}")
        rec = {k: v.strip() for k, v in zip(header, row)}
        for key in ("sr_path", "hr_path"):
            if not rec[key]:
                raise ManifestError(f"{where}: empty {key}")
        samples.append(Sample(
            sr_path=base / rec["sr_path"],
            hr_path=base / rec["hr_path"],
            score=_score(rec["score"], where),
            method=rec.get("method") or None,
            split=_split(rec.get("split"), where),
            where=where,
        ))
    return samples


def read_list_file(path: str | os.PathLike, root: str | os.PathLike | None = None,
                   split: str | None = None) -> list[Sample]:
    """Read one of the authors' list files: ``SR_NAME#SCORE#<unused>#HR_NAME`` per line.

    ``root`` (default: the list file's folder) holds ``SR_results/`` and ``HR/``. ``split``
    defaults to the file's stem when it is train, val or test.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    if split is None and path.stem.lower() in SPLITS:
        split = path.stem.lower()
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such list file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the list file ({exc})") from None
    samples = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        fields = line.strip().split("#")
        if len(fields) != 4:
            raise ManifestError(f"{where}: expected SR_NAME#SCORE#<unused>#HR_NAME (4 fields separated by '#'), "
                                f"got {len(fields)} field(s)")
        sr_name, score, _, hr_name = (f.strip() for f in fields)
        if not sr_name or not hr_name:
            raise ManifestError(f"{where}: empty SR or HR name")
        samples.append(Sample(
            sr_path=root / "SR_results" / sr_name,
            hr_path=root / "HR" / hr_name,
            score=_score(score, where),
            method=None,
            split=split,
            where=where,
        ))
    return samples


def load_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Sample]:
    """Samples of a CSV manifest, one list file, or a folder holding the authors' train/val/test.txt."""
    path = Path(path)
    if path.is_dir():
        found = [path / f for f in LIST_SPLIT_FILES.values() if (path / f).is_file()]
        if not found:
            raise ManifestError(f"{path}: a dataset folder must hold train.txt, val.txt or test.txt "
                                "(the authors' list files); or pass a CSV manifest")
        return [s for f in found for s in read_list_file(f, root=root if root is not None else path)]
    if path.suffix.lower() == ".csv":
        if root is not None:
            raise ManifestError(f"{path}: --root applies to the authors' list files only; CSV paths are "
                                "relative to the CSV's folder")
        return read_csv_manifest(path)
    if path.suffix.lower() == ".txt":
        return read_list_file(path, root=root)
    if not path.exists():
        raise ManifestError(f"{path}: no such manifest")
    raise ManifestError(f"{path}: unknown manifest type (expected a .csv manifest, an authors' .txt list, "
                        "or a folder with train.txt/val.txt/test.txt)")


def select_split(samples: list[Sample], split: str | None, manifest: str | os.PathLike) -> list[Sample]:
    """The samples of one split (``None``: all); an empty result is an error naming the manifest."""
    if split is not None and split not in SPLITS:
        raise ManifestError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not samples:
        raise ManifestError(f"{manifest}: the manifest is empty (no sample below its header)")
    chosen = list(samples) if split is None else [s for s in samples if s.split == split]
    if not chosen:
        have = sorted({s.split for s in samples if s.split})
        raise ManifestError(f"{manifest}: the {split} split is empty"
                            + (f" (splits present: {', '.join(have)})" if have else
                               " (no sample names a split: fill in a split column, or pass a manifest per split)"))
    return chosen


def check_images(samples: list[Sample], min_size: int = 1) -> list[tuple[int, int]]:
    """Open each pair's images and check their structure (``probe_image``: headers, and the
    whole file where the format allows, e.g. a truncated PNG), not their pixels: both exist,
    are images, same size.

    Returns each sample's (H, W). Cheap enough to run on every pair before any training
    starts, so that a bad line or file stops the run before anything is written.
    """
    from epban.imageio import ImageReadError, probe_image

    sizes = []
    for s in samples:
        pair = []
        for kind, p in (("SR", s.sr_path), ("HR", s.hr_path)):
            if not p.is_file():
                raise ManifestError(f"{s.where}: {kind} image {p} does not exist")
            try:
                pair.append(probe_image(p))
            except ImageReadError as exc:
                reason = str(exc).removeprefix(f"{p}: ")
                raise ManifestError(f"{s.where}: {kind} image {p} cannot be read: {reason}") from None
        if pair[0] != pair[1]:
            raise ManifestError(f"{s.where}: SR image {s.sr_path} is {pair[0][1]}x{pair[0][0]} but its HR "
                                f"{s.hr_path} is {pair[1][1]}x{pair[1][0]}")
        if min(pair[0]) < min_size:
            raise ManifestError(f"{s.where}: image {s.sr_path} is {pair[0][1]}x{pair[0][0]}; "
                                f"at least {min_size}x{min_size} is needed")
        sizes.append(pair[0])
    return sizes
