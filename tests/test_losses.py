import math
import warnings

import pytest
import torch

from epban import EfficientPBAN, MSSSIMLoss, PBANConfig, PBANLoss, SRLoss, SSIMLoss, ssim
from epban.models import pban as pban_module
from epban.models.loss_mode import LossModeOptions, PBANScorer


@pytest.fixture(scope="module")
def metric():
    torch.manual_seed(0)
    return EfficientPBAN(PBANConfig.tiny(score_range=(1.0, 5.0))).eval()


def pair(seed=0, b=2, size=48):
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(b, 3, size, size, generator=g)
    return (hr + 0.05 * torch.randn(hr.shape, generator=g)).clamp(0, 1), hr


def test_ssim_loss_is_one_minus_ssim():
    sr, hr = pair()
    torch.testing.assert_close(SSIMLoss()(sr, hr), 1 - ssim(sr, hr))
    torch.testing.assert_close(SSIMLoss(reduction="none")(sr, hr), 1 - ssim(sr, hr, reduction="none"))
    torch.testing.assert_close(SSIMLoss(weight=0.3)(sr, hr), 0.3 * (1 - ssim(sr, hr)))
    with pytest.raises(ValueError, match="reduction"):
        SSIMLoss(reduction="map")


def test_pban_loss_is_frozen_and_gradients_reach_only_sr(metric):
    loss_fn = PBANLoss(metric)
    loss_fn.train()
    assert not loss_fn.model.training
    assert all(not p.requires_grad for p in loss_fn.parameters())
    assert all(p.grad is None for p in metric.parameters())
    sr, hr = pair()
    sr.requires_grad_(True)
    hr.requires_grad_(True)
    loss = loss_fn(sr, hr)
    loss.backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    assert hr.grad is None
    # Rescaled by the config's score range: -(score - 1) / 4.
    with torch.no_grad():
        expected = -((metric(sr, hr) - 1.0) / 4.0).mean()
    torch.testing.assert_close(loss.detach(), expected)


def test_pban_loss_loads_a_checkpoint_directory(tmp_path, metric):
    metric.save_pretrained(tmp_path / "m")
    sr, hr = pair()
    torch.testing.assert_close(PBANLoss(tmp_path / "m")(sr, hr), PBANLoss(metric)(sr, hr))


def test_sr_loss_sums_weighted_parts(metric):
    sr, hr = pair()
    total, parts = SRLoss(l1=1.0, ssim=0.5, pban=0.1, pban_model=metric)(sr, hr)
    # Each part is named for what it holds (the docstring lists them).
    assert set(parts) == {"l1", "ssim_loss", "pban_loss"}
    assert all(f'"{name}"' in SRLoss.__doc__ for name in parts)
    expected = parts["l1"] + 0.5 * parts["ssim_loss"] + 0.1 * parts["pban_loss"]
    torch.testing.assert_close(total, expected)
    # The parts are unweighted (the SSIM weight is folded into its term): each against its loss.
    torch.testing.assert_close(parts["l1"], torch.nn.functional.l1_loss(sr, hr))
    torch.testing.assert_close(parts["ssim_loss"], 1 - ssim(sr, hr))
    torch.testing.assert_close(parts["pban_loss"], PBANLoss(metric)(sr, hr))
    with torch.no_grad():  # minus the rescaled score, not the score
        torch.testing.assert_close(parts["pban_loss"], -((metric(sr, hr) - 1.0) / 4.0).mean())
    # Gradients: those of the weighted sum written out.
    a, b = sr.clone().requires_grad_(True), sr.clone().requires_grad_(True)
    SRLoss(l1=0.7, ssim=0.5)(a, hr)[0].backward()
    (0.7 * torch.nn.functional.l1_loss(b, hr) + 0.5 * (1 - ssim(b, hr))).backward()
    torch.testing.assert_close(a.grad, b.grad)
    total, parts = SRLoss()(sr, hr)
    assert set(parts) == {"l1"}


def test_sr_loss_refuses_bad_settings():
    with pytest.raises(ValueError, match="pban_model"):
        SRLoss(pban=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        SRLoss(l1=-1.0)
    with pytest.raises(ValueError, match="weight"):
        SRLoss(ssim=0.5, ssim_kwargs={"weight": 2.0})
    # Both used to be taken: a hidden L1 term in the total and in parts["ssim_loss"], and
    # per-image SSIM values added to a batch-mean L1.
    with pytest.raises(ValueError, match="l1 argument"):
        SRLoss(ssim=0.5, ssim_kwargs={"l1": 1.0})
    with pytest.raises(ValueError, match="reduction"):
        SRLoss(l1=1.0, ssim=0.5, ssim_kwargs={"reduction": "none"})
    with pytest.raises(ValueError, match="not an EfficientPBAN"):
        SRLoss(pban=1.0, pban_model=torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(padding="reflect"), "padding"), (dict(backend="triton"), "backend"), (dict(win_size=4), "win_size"),
    (dict(sigma=float("inf")), "sigma"), (dict(data_range=-1.0), "data_range"), (dict(k1=float("nan")), "k1"),
])
def test_image_losses_check_their_arguments_when_made(kwargs, match):
    """Bad SSIM arguments used to be taken when made and refused at the first call."""
    for make in (SSIMLoss, MSSSIMLoss, lambda **kw: SRLoss(ssim=0.5, ssim_kwargs=kw)):
        if make is MSSSIMLoss and "padding" in kwargs:
            continue  # MS-SSIM has no padding argument
        with pytest.raises(ValueError, match=match):
            make(**kwargs)
    with pytest.raises(ValueError, match="weights"):
        MSSSIMLoss(weights=())
    metrics = pytest.importorskip("epban.metrics")  # needs torchmetrics
    with pytest.raises(ValueError, match=match):
        metrics.SSIMScore(**kwargs)


@pytest.mark.parametrize("weights", [{"l1": 1.0, "ssim": 0.5}, {"l1": 0.0, "ssim": 0.5}], ids=["l1+ssim", "ssim"])
def test_sr_loss_takes_a_bf16_sr_against_a_float32_hr(weights):
    """An SR network under autocast gives bf16; the SSIM term used to refuse it (naming x and y)."""
    sr, hr = pair()
    sr16 = sr.bfloat16().requires_grad_(True)
    total, parts = SRLoss(**weights)(sr16, hr)
    expected, _ = SRLoss(**weights)(sr16.detach().float(), hr)
    torch.testing.assert_close(total, expected)
    total.backward()
    assert sr16.grad is not None and sr16.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_pban_loss_mode_takes_a_model_of_any_float_dtype(metric, dtype):
    """The loss mode computes in its own dtypes; a float64 or bf16 model used to fail in its head."""
    import copy

    sr, hr = pair(seed=3)
    expected = PBANLoss(metric, loss_mode=True)(sr, hr)
    other = copy.deepcopy(metric).to(dtype)
    value = PBANLoss(other, loss_mode=True)(sr, hr)
    tol = 1e-5 if dtype == torch.float64 else 5e-2
    torch.testing.assert_close(value, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5, "1", None, True])
@pytest.mark.parametrize("term", ["l1", "ssim", "pban"])
def test_loss_weights_must_be_finite_and_non_negative(metric, term, bad):
    """A NaN weight used to switch its term off silently (NaN > 0 is False)."""
    with pytest.raises(ValueError, match=f"SRLoss {term} must be a finite non-negative"):
        SRLoss(**{term: bad}, pban_model=metric)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), -1.0, True])
def test_ssim_loss_weight_must_be_finite_and_non_negative(bad):
    with pytest.raises(ValueError, match="SSIMLoss weight must be a finite non-negative"):
        SSIMLoss(weight=bad)


@pytest.mark.parametrize("weights", [{"l1": 1.0}, {"l1": 0.0, "ssim": 1.0}, {"l1": 0.0, "pban": 1.0}],
                         ids=["l1", "ssim", "pban"])
def test_every_term_refuses_mismatched_shapes(metric, weights):
    """The L1 path used to broadcast a batch of 1 against a batch of 2 with only PyTorch's warning."""
    sr, hr = pair(b=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="same shape"):
            SRLoss(**weights, pban_model=metric)(sr, hr[:1])
        with pytest.raises(ValueError, match="same shape"):
            SRLoss(**weights, pban_model=metric)(sr, hr[..., :40])
    with pytest.raises(ValueError, match="same shape"):
        SSIMLoss()(sr, hr[:1])
    with pytest.raises(ValueError, match="same shape"):
        PBANLoss(metric)(sr, hr[:1])


def test_pban_loss_leaves_the_callers_model_as_it_is():
    """It scores with a frozen copy: the model given keeps its mode, requires_grad and weights."""
    torch.manual_seed(1)
    model = EfficientPBAN(PBANConfig.tiny())
    assert model.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for loss_mode in (False, True):
        loss_fn = PBANLoss(model, loss_mode=loss_mode)
        loss_fn.train()
        sr, hr = pair()
        loss_fn(sr.requires_grad_(True), hr).backward()
        assert model.training and all(m.training for m in model.modules())
        assert all(p.requires_grad and p.grad is None for p in model.parameters())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert PBANLoss(model).model is not model and PBANLoss(model, loss_mode=True).model is None
    assert PBANLoss(model).config == model.config and PBANLoss(model).config is not model.config
    # The copy is taken when the loss is made: later training of the model does not reach it.
    loss_fn = PBANLoss(model)
    sr, hr = pair()
    with torch.no_grad():
        expected = loss_fn(sr, hr)
        model.fc.bias.add_(1.0)
        torch.testing.assert_close(loss_fn(sr, hr), expected)


def _warnings_of(f, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f(*args)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("make", [
    lambda m: SRLoss(l1=1.0, ssim=0.5, pban=0.1, pban_model=m),
    lambda m: SRLoss(l1=1.0),
    lambda m: SSIMLoss(weight=0.5),
    lambda m: MSSSIMLoss(weights=(0.5, 0.5)),
    lambda m: PBANLoss(m),
    lambda m: PBANLoss(m, loss_mode=True),
], ids=["sr_loss", "sr_loss_l1", "ssim_loss", "ms_ssim_loss", "pban_loss", "pban_loss_mode"])
def test_losses_warn_once_on_images_that_look_like_0_to_255(metric, make, monkeypatch):
    """The first batch is read once (one host sync) and one warning says what is wrong; a
    training run is not stopped, and later batches are not read again."""
    calls = []
    real = pban_module.value_bounds
    monkeypatch.setattr("epban.losses.value_bounds", lambda *t: calls.append(len(t)) or real(*t))
    loss_fn = make(metric)
    sr, hr = pair()
    first = _warnings_of(loss_fn, 255 * sr, 255 * hr)
    assert len(first) == 1, first
    assert "look like 0..255" in first[0] and type(loss_fn).__name__ in first[0]
    assert _warnings_of(loss_fn, 255 * sr, 255 * hr) == []
    assert calls == [2]


@pytest.mark.parametrize("make", [
    lambda m: SRLoss(l1=1.0, ssim=0.5, pban=0.1, pban_model=m),
    lambda m: SSIMLoss(weight=0.5),
    lambda m: MSSSIMLoss(weights=(0.5, 0.5)),
    lambda m: PBANLoss(m),
], ids=["sr_loss", "ssim_loss", "ms_ssim_loss", "pban_loss"])
def test_losses_accept_an_overshoot_without_a_warning(metric, make):
    """An SR network's output a little outside [0, 1] is neither refused nor warned about."""
    sr, hr = pair()
    value = make(metric)(1.4 * sr - 0.2, hr)
    value = value[0] if isinstance(value, tuple) else value
    assert math.isfinite(float(value))
    assert _warnings_of(make(metric), 1.4 * sr - 0.2, hr) == []


def test_ssim_loss_range_follows_its_data_range():
    sr, hr = pair()
    assert _warnings_of(SSIMLoss(data_range=255.0), 255 * sr, 255 * hr) == []
    assert _warnings_of(SRLoss(l1=1.0, ssim=1.0, ssim_kwargs={"data_range": 255.0}), 255 * sr, 255 * hr) == []
    assert len(_warnings_of(SSIMLoss(data_range=1.0), 255 * sr, 255 * hr)) == 1


@pytest.mark.parametrize("loss_mode", [True, {"batch_gates": False}, LossModeOptions(fused_input=False)],
                         ids=["true", "dict", "options"])
def test_pban_loss_mode_gives_the_same_loss_and_gradient(metric, loss_mode):
    sr, hr = pair(seed=4)
    a = sr.clone().requires_grad_(True)
    b = sr.clone().requires_grad_(True)
    reference = PBANLoss(metric)(a, hr)
    loss = PBANLoss(metric, loss_mode=loss_mode)
    assert isinstance(loss.scorer, PBANScorer)
    fast = loss(b, hr)
    reference.backward()
    fast.backward()
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7)


def test_pban_loss_mode_arguments(metric):
    assert PBANLoss(metric).scorer is None and PBANLoss(metric, loss_mode=False).scorer is None
    options = LossModeOptions(dtype=torch.bfloat16, stem_pad=False)
    assert PBANLoss(metric, loss_mode={"dtype": torch.bfloat16, "stem_pad": False}).scorer.options == options
    assert PBANLoss(metric, loss_mode=options).scorer.options == options
    with pytest.raises(ValueError, match="loss_mode"):
        PBANLoss(metric, loss_mode="fast")
    with pytest.raises(ValueError, match="dtype"):
        PBANLoss(metric, loss_mode={"dtype": torch.float16})


def test_reference_ssim_ignores_autocast():
    sr, hr = pair(seed=5)
    expected = ssim(sr, hr, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssim(sr, hr, backend="reference")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
