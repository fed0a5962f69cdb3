"""What metric and SR training share (``epban.training``): RNG state, atomic checkpoints, JSON records, the device."""
import json
import math
import random

import numpy as np
import pytest
import torch

from epban.training import checkpoint, distributed
from epban.training.records import write_json


def _draws(generator: torch.Generator) -> tuple:
    return (torch.rand(3).tolist(), float(np.random.rand()), random.random(),
            torch.rand(2, generator=generator).tolist())


def test_rng_round_trip_restores_every_generator():
    loader = torch.Generator().manual_seed(7)
    state = checkpoint.capture_rng({"loader": loader})
    first = _draws(loader)
    _draws(loader)
    checkpoint.restore_rng(state, {"loader": loader})
    assert _draws(loader) == first


def test_rng_state_without_named_generators():
    state = checkpoint.capture_rng()
    first = _draws(torch.Generator())[:3]
    checkpoint.restore_rng(state)
    assert _draws(torch.Generator())[:3] == first
    del state["generators"]  # a state saved without the key restores too
    checkpoint.restore_rng(state, {"loader": torch.Generator()})


def test_save_atomic_round_trip_leaves_no_temporary(tmp_path):
    state = {"step": 3, "rng": checkpoint.capture_rng(), "w": torch.arange(4.0)}
    path = checkpoint.save_atomic(state, tmp_path / "checkpoint.pt")
    loaded = checkpoint.load_state(path)
    assert loaded["step"] == 3 and torch.equal(loaded["w"], state["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_write_dir_atomic_keeps_the_old_directory_on_failure(tmp_path):
    target = tmp_path / "last"

    def write(text):
        def _write(d):
            (d / checkpoint.TRAINING_INFO_FILE).write_text(text)
        return _write

    checkpoint.write_dir_atomic(target, write("one"))

    def fail(d):
        (d / checkpoint.TRAINING_INFO_FILE).write_text("two")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpoint.write_dir_atomic(target, fail)
    assert checkpoint.resolve(target) == target and (target / checkpoint.TRAINING_INFO_FILE).read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    checkpoint.write_dir_atomic(target, write("two"))
    assert (target / checkpoint.TRAINING_INFO_FILE).read_text() == "two"
    assert checkpoint.resolve(tmp_path / "none") is None


def test_write_json_is_strict(tmp_path):
    path = write_json(tmp_path / "r.json", {"srcc": math.nan, "psnr": [30.5, math.inf], "n": 3, "name": "a"})
    assert json.loads(path.read_text()) == {"srcc": None, "psnr": [30.5, None], "n": 3, "name": "a"}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_setup_single_process_and_missing_cuda():
    ctx = distributed.setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert ctx.device == torch.device("cpu")
    assert distributed.all_gather_objects(ctx, 5) == [5] and distributed.any_rank(ctx, True)
    distributed.cleanup(ctx)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            distributed.setup("cuda")
