"""The bundled tiny-ssim weights, the procedural data they were made from, and init= of train_metric."""
import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import epban
from epban import weights
from epban.data.procedural import dead_leaves, degraded_pair, random_degradation
from epban.models.pban import EfficientPBAN, PBANConfig
from epban.metric.trainer import _initial_model, _resolve_init


def test_dead_leaves_deterministic_in_range():
    a = dead_leaves(40, np.random.default_rng(3))
    b = dead_leaves(40, np.random.default_rng(3))
    c = dead_leaves(40, np.random.default_rng(4))
    assert a.shape == (40, 40, 3) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert np.unique(a.reshape(-1, 3), axis=0).shape[0] > 20  # many leaves, not one flat colour


def test_degraded_pair_differs_from_its_reference():
    rng = np.random.default_rng(0)
    for _ in range(5):
        sr, hr, params = degraded_pair(48, rng)
        assert sr.shape == hr.shape == (48, 48, 3) and params
        assert np.abs(sr - hr).mean() > 0 or params.get("jpeg", 0) > 90
    assert all(random_degradation(rng) for _ in range(20))


def test_bundled_weights_load_and_predict_ssim():
    path = weights.path("tiny-ssim")
    assert "tiny-ssim" in weights.names()
    meta = json.loads((path / "pretrain.json").read_text())
    assert meta["target"] == "ssim" and meta["std"] > 0
    model = EfficientPBAN.from_checkpoint(path).float()
    assert model.config == PBANConfig.tiny(score_range=(0.0, 1.0))
    rng = np.random.default_rng(123)  # pairs the pretraining never saw
    pairs = [degraded_pair(96, rng) for _ in range(12)]
    sr = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    hr = torch.from_numpy(np.stack([p[1] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        pred = model(sr, hr)
        truth = epban.ssim(sr, hr, data_range=1.0, reduction="none")
    assert spearmanr(pred, truth)[0] > 0.6
    assert (pred - truth).abs().mean() < 0.2


def test_missing_bundled_weights_error():
    with pytest.raises(FileNotFoundError, match="no bundled weights 'nope'"):
        weights.path("nope")


def test_resolve_init():
    assert _resolve_init("auto", "tiny") == weights.path("tiny-ssim")
    assert _resolve_init("auto", "resnet34") is None
    assert _resolve_init("random", "tiny") is None
    with pytest.raises(FileNotFoundError, match="init="):
        _resolve_init("/no/such/dir", "tiny")


def test_initial_model_rescales_output_to_the_scores():
    """The pretrained output (SSIM units) is mapped affinely onto the training scores' mean and std."""
    scores = np.array([20.0, 40.0, 60.0, 90.0])
    base = EfficientPBAN.from_checkpoint(weights.path("tiny-ssim")).float()
    model = _initial_model(weights.path("tiny-ssim"), "tiny", (20.0, 90.0), scores)
    assert model.config.score_range == (20.0, 90.0) and model.config.name == "tiny"
    meta = json.loads((weights.path("tiny-ssim") / "pretrain.json").read_text())
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        z = (base(x, y) - meta["mean"]) / meta["std"]
        assert torch.allclose(model(x, y), scores.mean() + scores.std() * z, rtol=1e-4, atol=1e-3)


def test_initial_model_refuses_another_architecture():
    with pytest.raises(ValueError, match="another architecture"):
        _initial_model(weights.path("tiny-ssim"), PBANConfig.tiny(stem_width=8), (0.0, 1.0), np.array([0.0, 1.0]))


def test_leaf_scene_deterministic_in_range():
    from epban.data.procedural import leaf_scene

    a = leaf_scene(48, np.random.default_rng(7))
    assert a.shape == (48, 48, 3) and a.dtype == np.float32
    assert np.array_equal(a, leaf_scene(48, np.random.default_rng(7)))
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0
    sr, hr, params = degraded_pair(48, np.random.default_rng(1), images="scenes")
    assert sr.shape == hr.shape == (48, 48, 3) and params
