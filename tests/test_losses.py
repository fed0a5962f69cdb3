import pytest
import torch

from epban import EfficientPBAN, PBANConfig, PBANLoss, SRLoss, SSIMLoss, ssim


@pytest.fixture(scope="module")
def metric():
    torch.manual_seed(0)
    return EfficientPBAN(PBANConfig.tiny(score_range=(1.0, 5.0)))


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
    assert set(parts) == {"l1", "ssim", "pban"}
    expected = parts["l1"] + 0.5 * parts["ssim"] + 0.1 * parts["pban"]
    torch.testing.assert_close(total, expected)
    # The parts are unweighted (the SSIM weight is folded into its term): each against its loss.
    torch.testing.assert_close(parts["l1"], torch.nn.functional.l1_loss(sr, hr))
    torch.testing.assert_close(parts["ssim"], 1 - ssim(sr, hr))
    torch.testing.assert_close(parts["pban"], PBANLoss(metric)(sr, hr))
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


def test_pban_loss_mode_gives_the_same_loss_and_gradient(metric):
    sr, hr = pair(seed=4)
    a = sr.clone().requires_grad_(True)
    b = sr.clone().requires_grad_(True)
    reference = PBANLoss(metric)(a, hr)
    fast = PBANLoss(metric, loss_mode=True)(b, hr)
    reference.backward()
    fast.backward()
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7)


def test_reference_ssim_ignores_autocast():
    sr, hr = pair(seed=5)
    expected = ssim(sr, hr, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssim(sr, hr, backend="reference")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
