"""Run checkpoints: ``RUN/best`` and ``RUN/last`` are model directories (``save_pretrained``)
plus ``training.json``; ``last`` also holds ``training_state.pt`` (optimiser, scheduler,
position in the run, RNG states) for ``--resume``.

A checkpoint directory is written under a temporary name and swapped in by renames, so a
reader never sees a half-written one: at any moment ``RUN/last`` is either the previous
complete checkpoint or the new complete one (during the swap, the previous one is briefly
``RUN/.last.old``, which ``resolve`` falls back to).
"""
from __future__ import annotations

import json
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


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def capture_rng(generators: dict[str, torch.Generator]) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for name, g in generators.items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_state(directory: Path) -> dict:
    # Our own file, but it holds numpy and python RNG states, which weights_only refuses.
    return torch.load(Path(directory) / TRAINING_STATE_FILE, map_location="cpu", weights_only=False)
