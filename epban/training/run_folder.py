"""The run folder of a training or evaluation command (``--out``): checked before any work,
made with an error that names ``--out``; and the error of a training run that diverged."""
from __future__ import annotations

import os
from pathlib import Path


class TrainingDiverged(ValueError):
    """The training loss (or the model's validation scores) became non-finite, most often from
    too high a learning rate; the run's last good checkpoint, if any, is kept."""


def check_resume_or_overwrite(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them, not both")


def check_writable(out: Path) -> None:
    """ValueError naming ``--out`` unless ``out`` is a folder, or can be made one, that we may
    write in (checked before any work; nothing is created)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: cannot create this folder ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: no permission to write in {existing}")


def make_out(out: Path) -> Path:
    """Create the folder ``out`` (and its parents); a refusal of the system names ``--out``."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create this folder ({exc.strerror or exc})") from None
    return out
