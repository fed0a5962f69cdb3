"""Checkpoints that resume exactly: RNG states, and files and directories written atomically.

A file is written under a temporary name and renamed (``save_atomic``). A checkpoint
directory (the metric's ``RUN/best`` and ``RUN/last``: a ``save_pretrained`` model
directory plus ``training.json``, and for ``last`` also ``training_state.pt``) is written
under a temporary name and swapped in by renames (``write_dir_atomic``), so a reader never
sees a half-written one: at any moment ``RUN/last`` is either the previous complete
checkpoint or the new complete one (during the swap, the previous one is briefly
``RUN/.last.old``, which ``resolve`` falls back to).
"""
from __future__ import annotations

import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch

TRAINING_STATE_FILE = "training_state.pt"
TRAINING_INFO_FILE = "training.json"


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict:
    """The state of every random number generator a run draws from: torch (CPU and every
    CUDA device), numpy, Python's ``random``, and the named ``generators`` (a DataLoader's)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back what ``capture_rng`` took. CUDA states are restored when the process sees as
    many devices as the run that saved them."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name in saved:
            g.set_state(saved[name])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path: Path) -> Path:
    """``torch.save(obj, path)`` through a temporary file: never a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load_state(path: Path) -> dict:
    """A checkpoint file written by ``save_atomic``, on the CPU (RNG states must stay CPU
    tensors; ``load_state_dict`` moves the rest to the model's device)."""
    # Our own file, but it holds numpy and Python RNG states, which weights_only refuses.
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such checkpoint file") from None
    except Exception as exc:  # truncated, empty or foreign: torch.load's errors vary by the damage
        reason = next((line.split(". ")[0] for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {reason})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a checkpoint of ours (it holds a {type(state).__name__}, not a dict)")
    return state


def write_dir_atomic(target: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)``, then swap ``tmp_dir`` in as ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = target.parent / f".{target.name}.old"
    try:
        tmp.mkdir()
        write(tmp)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


def resolve(target: Path) -> Path | None:
    """The complete checkpoint directory for ``target`` (or its pre-swap copy), if any."""
    target = Path(target)
    for candidate in (target, target.parent / f".{target.name}.old"):
        if (candidate / TRAINING_INFO_FILE).exists():
            return candidate
    return None


def load_training_state(directory: Path) -> dict:
    """``training_state.pt`` of a checkpoint directory."""
    return load_state(Path(directory) / TRAINING_STATE_FILE)
