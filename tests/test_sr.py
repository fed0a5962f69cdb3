"""SR training: the bicubic downsampler, Y-channel metrics, loss terms, training, resume, bad input, the demo."""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import epban
from epban.imageio import write_image
from epban.losses import SRLoss
from epban.sr import SRFolderDataset, SRTrainConfig, build_network, psnr_y, rgb_to_y, run_ablation, ssim_y, train_sr
from epban.sr.data import StepSampler, collate
from epban.sr.imresize import bicubic_downsample, imresize, resize_matrix

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


def _photo(name="astronaut", size=None) -> torch.Tensor:
    import skimage.data

    a = getattr(skimage.data, name)()
    t = torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(2, 0, 1).float() / 255
    return t if size is None else t[:, :size, :size]


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """Three small HR training images and one validation image (sizes divisible by 2)."""
    root = tmp_path_factory.mktemp("sr")
    train, val = root / "train", root / "val"
    train.mkdir()
    val.mkdir()
    photo = _photo()
    for i, (top, left) in enumerate(((0, 0), (100, 180), (300, 260))):
        write_image(train / f"img{i}.png", photo[:, top : top + 96, left : left + 128])
    write_image(val / "val0.png", _photo("chelsea")[:, 40:104, 150:214])
    return train, val


@pytest.fixture(scope="module")
def tiny_pban(tmp_path_factory):
    """A randomly initialised tiny metric, saved in our checkpoint format."""
    torch.manual_seed(0)
    model = epban.EfficientPBAN(epban.PBANConfig.preset("tiny")).eval()
    path = tmp_path_factory.mktemp("pban") / "tiny"
    model.save_pretrained(path)
    return path


def _config(data_dirs, tiny_pban, out, **kw) -> SRTrainConfig:
    train, _ = data_dirs
    base = dict(train=str(train), out=str(out), net="tiny", scale=2, patch_size=32, batch_size=2, steps=4,
                lr=5e-4, l1=1.0, ssim=1.0, pban=0.5, pban_weights=str(tiny_pban), eval_every=1000,
                save_every=1000, device="cpu", quiet=True)
    base.update(kw)
    return SRTrainConfig(**base)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------- imresize
def test_imresize_matches_matlab_without_antialiasing():
    # MATLAB/Octave: imresize(reshape(0:15, 4, 4)', 0.5, 'bicubic', 'AntiAliasing', false)
    x = torch.arange(16, dtype=torch.float64).view(4, 4)
    expected = torch.tensor([[2.1875, 4.3125], [10.6875, 12.8125]], dtype=torch.float64)
    torch.testing.assert_close(imresize(x, 0.5, antialias=False), expected, rtol=0, atol=1e-12)


def test_imresize_antialiased_half_by_hand():
    # x0.5 with antialiasing: h(t) = cubic(t / 2) / 2 over 8 taps. For output 1 (x = 1.5) the
    # taps at distances 3.5, 2.5, 1.5, 0.5 weigh cubic(1.75), cubic(1.25), cubic(0.75), cubic(0.25)
    # / 2 = -0.01171875, -0.03515625, 0.11328125, 0.43359375 (symmetric, summing to 1); the
    # left taps fall outside and mirror onto pixels 3, 2, 1 (values 2, 1, 0 of the ramp 0..3):
    # -0.01171875*2 - 0.03515625*1 + 0.11328125*0 + 0.43359375*(0 + 1) + 0.11328125*2
    #   - 0.03515625*3 - 0.01171875*3 = 0.4609375, and 3 - 0.4609375 at the other end.
    a = torch.tensor([0.4609375, 2.5390625], dtype=torch.float64)
    x = torch.arange(16, dtype=torch.float64).view(4, 4)  # value = 4 row + col
    torch.testing.assert_close(imresize(x, 0.5), 4 * a[:, None] + a[None, :], rtol=0, atol=1e-12)


def test_imresize_x4_kernel_is_the_stretched_cubic():
    # Downsampling by 4, output pixel u (0-based) is centred at 4u + 1.5; input pixels at
    # distance d = 0.5, 1.5, ..., 7.5 get cubic(d / 4) / 4: 16 taps (the kernel's support of
    # 4 input pixels stretched 4 times). Values of cubic at d/4 = 0.125 ... 1.875 by hand:
    half = torch.tensor([0.9638671875, 0.7275390625, 0.3896484375, 0.0908203125,
                         -0.0478515625, -0.0732421875, -0.0439453125, -0.0068359375], dtype=torch.float64) / 4
    expected_taps = torch.cat([half.flip(0), half])
    m = torch.from_numpy(resize_matrix(64, 16, 0.25))
    for u in (4, 5, 9):  # interior outputs: no mirroring
        row = m[u]
        nz = row.nonzero().flatten()
        assert nz.tolist() == list(range(4 * u - 6, 4 * u + 10))
        torch.testing.assert_close(row[nz], expected_taps, rtol=0, atol=1e-15)
    # At the border the taps left of the image mirror back onto it: the weights still sum to 1.
    torch.testing.assert_close(m.sum(1), torch.ones(16, dtype=torch.float64))
    assert m[0, :10].nonzero().numel() == 10


def test_imresize_properties():
    x = torch.full((2, 3, 16, 24), 0.37, dtype=torch.float64)
    torch.testing.assert_close(imresize(x, 0.25), torch.full((2, 3, 4, 6), 0.37, dtype=torch.float64))
    ramp = torch.arange(64, dtype=torch.float64).expand(1, 64)
    # The cubic reproduces linear functions: interior LR pixels equal the ramp at their centres.
    torch.testing.assert_close(imresize(ramp, 0.25)[0, 3:-3], torch.arange(3, 13, dtype=torch.float64) * 4 + 1.5)
    assert imresize(torch.rand(1, 3, 10, 14), 4.0).shape == (1, 3, 40, 56)


def test_random_crop_lr_equals_crop_of_whole_lr(data_dirs):
    train, _ = data_dirs
    ds = SRFolderDataset(train, 4, patch_size=32, augment=False, quantize_lr=False)
    hr = ds._read_hr(0)
    whole = bicubic_downsample(hr, 4)
    for ly, lx in ((0, 0), (5, 7), (16, 24)):  # corners and interior of a 24x32 LR grid
        lr, hr_crop = ds._crop(0, hr, ly, lx)
        torch.testing.assert_close(lr, whole[:, ly : ly + 8, lx : lx + 8], rtol=0, atol=1e-6)
        torch.testing.assert_close(hr_crop, hr[:, 4 * ly : 4 * ly + 32, 4 * lx : 4 * lx + 32])


# ---------------------------------------------------------------------------- metrics
def test_y_channel_is_matlab_rgb2ycbcr():
    from skimage.color import rgb2ycbcr

    x = torch.rand(2, 3, 8, 9, dtype=torch.float64)
    ref = rgb2ycbcr(x.permute(0, 2, 3, 1).numpy())[..., 0]  # MATLAB's formula, Y in [16, 235]
    np.testing.assert_allclose(rgb_to_y(x)[:, 0].numpy() * 255, ref, rtol=0, atol=1e-10)
    white = torch.ones(1, 3, 1, 1, dtype=torch.float64)
    assert abs(float(rgb_to_y(white)) - 235 / 255) < 1e-12


@pytest.mark.parametrize("source", ["photo", "random"])
def test_psnr_ssim_on_y_equal_scikit_image(source):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if source == "photo":
        hr = _photo("astronaut", 96)[None]
        sr = (hr + 0.03 * torch.randn_like(hr)).clamp(0, 1)
    else:
        g = torch.Generator().manual_seed(1)
        hr, sr = torch.rand(2, 3, 40, 48, generator=g), torch.rand(2, 3, 40, 48, generator=g)
    for crop in (0, 4):
        ys, yh = rgb_to_y(sr.double()), rgb_to_y(hr.double())
        if crop:
            ys, yh = ys[..., crop:-crop, crop:-crop], yh[..., crop:-crop, crop:-crop]
        for b in range(hr.shape[0]):
            a, r = ys[b, 0].numpy(), yh[b, 0].numpy()
            ref_psnr = peak_signal_noise_ratio(r, a, data_range=1.0)
            ref_ssim = structural_similarity(r, a, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False)
            assert abs(float(psnr_y(sr, hr, crop)[b]) - ref_psnr) < 1e-4
            assert abs(float(ssim_y(sr, hr, crop)[b]) - ref_ssim) < 1e-4


# ---------------------------------------------------------------------------- losses and training
def test_each_loss_term_contributes_gradient(tiny_pban):
    torch.manual_seed(0)
    net = build_network("tiny", 2)
    lr, hr = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 32, 32)
    pban = epban.EfficientPBAN.from_checkpoint(tiny_pban)

    def grads(**weights):
        net.zero_grad()
        loss, _ = SRLoss(pban_model=pban, **weights)(net(lr), hr)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    full = grads(l1=1.0, ssim=1.0, pban=1.0)
    for term in ("l1", "ssim", "pban"):
        alone = grads(**{"l1": 0.0, "ssim": 0.0, "pban": 0.0, term: 1.0})
        assert alone.abs().sum() > 0, f"{term} gives no gradient"
        without = grads(**{"l1": 1.0, "ssim": 1.0, "pban": 1.0, term: 0.0})
        torch.testing.assert_close(without + alone, full, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(without, full), f"switching {term} off does not change the gradient"


def test_switching_a_term_off_changes_the_update(data_dirs, tiny_pban, tmp_path):
    weights = {}
    for name, kw in (("all", {}), ("no_l1", {"l1": 0.0}), ("no_ssim", {"ssim": 0.0}), ("no_pban", {"pban": 0.0})):
        train_sr(_config(data_dirs, tiny_pban, tmp_path / name, steps=1, **kw))
        weights[name] = _load(tmp_path / name / "net.pt")
    for name in ("no_l1", "no_ssim", "no_pban"):
        assert any(not torch.equal(weights[name][k], weights["all"][k]) for k in weights["all"]), name


def test_few_steps_lower_the_training_loss(data_dirs, tiny_pban, tmp_path):
    cfg = _config(data_dirs, tiny_pban, tmp_path, steps=8)
    ds = SRFolderDataset(cfg.train, cfg.scale, patch_size=cfg.patch_size)
    batch = collate([ds[key] for key in StepSampler(len(ds), 6, 1, seed=123)])
    criterion = SRLoss(cfg.l1, cfg.ssim, cfg.pban, pban_model=cfg.pban_weights)
    torch.manual_seed(cfg.seed)
    net = build_network(cfg.net, cfg.scale)
    with torch.no_grad():
        before = float(criterion(net(batch["lr"]), batch["hr"])[0])
    train_sr(cfg)
    net.load_state_dict(_load(tmp_path / "net.pt"))
    with torch.no_grad():
        after = float(criterion(net(batch["lr"]), batch["hr"])[0])
    assert after < before


def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_resume_equals_uninterrupted_run(data_dirs, tiny_pban, tmp_path):
    # The frozen metric is deterministic; what resume must restore is the network, Adam, the schedule, the data order.
    kw = dict(steps=4, pban=0.0, log_every=1)
    train_sr(_config(data_dirs, tiny_pban, tmp_path / "straight", **kw))
    train_sr(_config(data_dirs, tiny_pban, tmp_path / "resumed", stop_at=2, **kw))
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["step"] == 2
    # A run that died after logging step 3 but before its next checkpoint: resuming from step 2
    # writes step 3 again, so the row logged after the checkpoint must go.
    log = tmp_path / "resumed" / "log.csv"
    stale = _csv(log)[-1] | {"step": "3", "loss": "123.0"}
    with log.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(stale)).writerow(stale)
    train_sr(_config(data_dirs, tiny_pban, tmp_path / "resumed", resume=True, **kw))
    a, b = _load(tmp_path / "straight" / "net.pt"), _load(tmp_path / "resumed" / "net.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
    # log.csv continues as the uninterrupted run's: the same steps and values; time keeps counting
    straight, resumed = _csv(tmp_path / "straight" / "log.csv"), _csv(log)
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == ["1", "2", "3", "4"]
    for r, s in zip(resumed, straight):
        for key in ("loss", "l1", "ssim_loss", "lr"):
            assert float(r[key]) == pytest.approx(float(s[key]), rel=1e-5), (r["step"], key)
    seconds = [float(r["seconds"]) for r in resumed]
    assert seconds == sorted(seconds)


def _patch_loss(monkeypatch, *, interrupt_at: int, nan_at: int | None = None) -> None:
    """Make the training loss NaN at its ``nan_at``-th call and Ctrl-C arrive at its ``interrupt_at``-th."""
    from epban.sr import trainer

    calls = []

    class Loss(SRLoss):
        def forward(self, sr, hr):
            calls.append(None)
            if len(calls) == interrupt_at:
                raise KeyboardInterrupt
            loss, parts = super().forward(sr, hr)
            return (loss * float("nan") if len(calls) == nan_at else loss), parts

    monkeypatch.setattr(trainer, "SRLoss", Loss)


def test_ctrl_c_saves_a_checkpoint_unless_the_loss_went_non_finite(data_dirs, tiny_pban, tmp_path, monkeypatch,
                                                                    capsys):
    """Ctrl-C saves a checkpoint that --resume continues exactly; after a non-finite loss it keeps
    the last good checkpoint instead."""
    kw = dict(steps=4, pban=0.0, log_every=1)
    train_sr(_config(data_dirs, tiny_pban, tmp_path / "straight", **kw))
    cut = tmp_path / "cut"
    _patch_loss(monkeypatch, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        train_sr(_config(data_dirs, tiny_pban, cut, **kw))
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["step"] == 2
    _patch_loss(monkeypatch, nan_at=1, interrupt_at=2)  # step 3 goes NaN, Ctrl-C at step 4
    with pytest.raises(KeyboardInterrupt):
        train_sr(_config(data_dirs, tiny_pban, cut, resume=True, **(kw | {"log_every": 1000})))
    assert "no checkpoint was saved" in capsys.readouterr().out
    state = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and all(torch.isfinite(w).all() for w in state["net"].values())
    monkeypatch.undo()
    train_sr(_config(data_dirs, tiny_pban, cut, resume=True, **kw))
    a, b = _load(tmp_path / "straight" / "net.pt"), _load(cut / "net.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _csv(cut / "log.csv")] == ["1", "2", "3", "4"]


def test_log_columns_say_what_they_hold(data_dirs, tiny_pban, tmp_path):
    """log.csv holds the loss and its unweighted parts under SRLoss's names (ssim_loss = 1 - SSIM,
    pban_loss = the negated rescaled score); eval.csv the metrics, pban_score the raw score."""
    _, val = data_dirs
    cfg = _config(data_dirs, tiny_pban, tmp_path, steps=2, log_every=1, eval_every=2, val=str(val))
    summary = train_sr(cfg)
    log = _csv(tmp_path / "log.csv")
    assert list(log[0]) == ["step", "loss", "l1", "ssim_loss", "pban_loss", "lr", "seconds"]
    for row in log:
        parts = {k: float(row[k]) for k in ("l1", "ssim_loss", "pban_loss")}
        total = cfg.l1 * parts["l1"] + cfg.ssim * parts["ssim_loss"] + cfg.pban * parts["pban_loss"]
        assert float(row["loss"]) == pytest.approx(total, rel=1e-5)
        assert 0 < parts["ssim_loss"] < 2
    evals = _csv(tmp_path / "eval.csv")
    assert list(evals[0])[:4] == ["step", "psnr_y", "ssim_y", "pban_score"] and "pban" not in evals[0]
    assert float(evals[-1]["pban_score"]) == pytest.approx(summary["final"]["mean"]["pban_score"])


@pytest.fixture(scope="module")
def two_val_images(tmp_path_factory):
    """Two different validation images, so a mean over images differs from either image's value."""
    folder = tmp_path_factory.mktemp("val2")
    write_image(folder / "a.png", _photo("chelsea")[:, 40:104, 150:214])
    write_image(folder / "b.png", _photo("coffee")[:, 100:164, 200:264])
    return folder


def test_validation_means_are_the_torchmetrics_metrics(data_dirs, tiny_pban, two_val_images, tmp_path, monkeypatch):
    """With torchmetrics installed, each validation adds every image to a PBANScore and an
    SSIMScore (on Y), and eval.csv's pban_score and ssim_y are their compute()."""
    metrics = pytest.importorskip("epban.metrics")
    created = {"PBANScore": [], "SSIMScore": []}
    for name, instances in created.items():
        def init(self, *args, _base=getattr(metrics, name), _instances=instances, **kwargs):
            _base.__init__(self, *args, **kwargs)
            _instances.append(self)
        monkeypatch.setattr(metrics, name, type(name, (getattr(metrics, name),), {"__init__": init}))
    summary = train_sr(_config(data_dirs, tiny_pban, tmp_path, steps=1, val=str(two_val_images)))
    assert [len(v) for v in created.values()] == [2, 2]  # the bicubic baseline, then the evaluation at step 1
    final = _csv(tmp_path / "eval.csv")[-1]
    images = summary["final"]["images"]
    for column, metric in (("pban_score", created["PBANScore"][-1]), ("ssim_y", created["SSIMScore"][-1])):
        assert int(metric.count) == 2
        assert float(final[column]) == pytest.approx(float(metric.compute()), rel=1e-6)
        assert float(final[column]) == pytest.approx(np.mean([r[column] for r in images.values()]), rel=1e-6)
        assert images["a"][column] != images["b"][column]


def test_validation_without_torchmetrics_gives_the_same_values(two_val_images, tiny_pban, monkeypatch, recwarn):
    """Without torchmetrics, validation averages the same values in plain Python, silently."""
    from epban.sr.evaluate import evaluate

    val = SRFolderDataset(two_val_images, 2, augment=False)
    torch.manual_seed(0)
    net = build_network("tiny", 2)
    model = epban.EfficientPBAN.from_checkpoint(tiny_pban)
    with_metrics = evaluate(net, val, "cpu", 2, scorer=model)
    monkeypatch.setitem(sys.modules, "epban.metrics", None)  # `from epban.metrics import ...` fails
    plain = evaluate(net, val, "cpu", 2, scorer=model)
    assert not recwarn.list
    assert list(plain["mean"]) == ["psnr_y", "ssim_y", "pban_score"]
    assert list(with_metrics["mean"]) == list(plain["mean"])
    assert list(with_metrics["images"]) == list(plain["images"]) == ["a", "b"]
    for key, value in plain["mean"].items():
        assert with_metrics["mean"][key] == pytest.approx(value, rel=1e-6), key
        for name, row in plain["images"].items():
            assert with_metrics["images"][name][key] == pytest.approx(row[key], rel=1e-6), (name, key)
    with pytest.raises(ValueError, match="without the loss mode"):
        evaluate(net, val, "cpu", 2, scorer=epban.PBANLoss(model, loss_mode=True))


def test_every_image_is_opened_before_the_first_step(data_dirs, tiny_pban, tmp_path):
    """A damaged PNG whose header reads fine, in the training or the validation folder, stops the
    run before anything is written, naming the file."""
    train, val = data_dirs
    for role, source, name in (("train", train, "img1.png"), ("val", val, "val0.png")):
        folder = tmp_path / f"{role}_data"
        shutil.copytree(source, folder)
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
        out = tmp_path / f"{role}_out"
        cfg = _config(data_dirs, tiny_pban, out, steps=1, **{role: str(folder)})
        with pytest.raises(ValueError, match=rf"{role}_data/{name}: cannot read as an image"):
            train_sr(cfg)
        assert not out.exists()


def test_out_must_be_new_empty_or_a_run_of_ours(data_dirs, tiny_pban, tmp_path, capsys):
    from epban.cli import main

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty and holds no SR run"):
        train_sr(_config(data_dirs, tiny_pban, other, steps=1, pban=0.0))
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    train, _ = data_dirs
    assert main(["train-sr", "--train", str(train), "--out", str(other), "--net", "tiny", "--scale", "2",
                 "--patch-size", "32", "--steps", "1", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no SR run" in err[0]

    # A run of ours is refused without --resume or --overwrite (nothing changes); --overwrite
    # replaces it, and files it did not write stay.
    run = tmp_path / "run"
    train_sr(_config(data_dirs, tiny_pban, run, steps=3, pban=0.0, log_every=1))
    (run / "notes.txt").write_text("keep")
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    argv = _argv(data_dirs, run, "--steps", "1")
    assert "--resume" in _cli_error(capsys, argv) and "--overwrite" in _cli_error(capsys, argv)
    assert "give one of them" in _cli_error(capsys, [*argv, "--resume", "--overwrite"])
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    train_sr(_config(data_dirs, tiny_pban, run, steps=1, pban=0.0, log_every=1, overwrite=True))
    assert [r["step"] for r in _csv(run / "log.csv")] == ["1"]
    assert (run / "notes.txt").read_text() == "keep"
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 1
    (tmp_path / "empty").mkdir()
    train_sr(_config(data_dirs, tiny_pban, tmp_path / "empty", steps=1, pban=0.0))


def _argv(data_dirs, out, *extra) -> list[str]:
    """``epban train-sr`` on the tiny network and the training images, two steps on the CPU."""
    train, _ = data_dirs
    return ["train-sr", "--train", str(train), "--out", str(out), "--net", "tiny", "--scale", "2", "--patch-size", "32",
            "--batch-size", "2", "--steps", "2", "--device", "cpu", "--quiet", *extra]


def _cli_error(capsys, argv) -> str:
    """The one line ``epban`` prints for a user error (exit status 2)."""
    from epban.cli import main

    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's errors
        status = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    return err[0]


def test_ablation_writes_one_table_and_figure(data_dirs, tiny_pban, tmp_path):
    """Four settings, same seed/data/budget; each run evaluates, writes samples; one table and figure."""
    _, val = data_dirs
    report = run_ablation(_config(data_dirs, tiny_pban, tmp_path, steps=1, val=str(val), eval_every=1),
                          ssim_weight=1.0, pban_weight=0.5)
    assert [s["setting"] for s in report["settings"]] == ["L1", "L1+SSIM", "L1+PBAN", "L1+SSIM+PBAN"]
    assert [s["weights"]["pban"] for s in report["settings"]] == [0.0, 0.0, 0.5, 0.5]
    assert {"psnr_y", "ssim_y", "pban_score"} <= set(report["settings"][0]["mean"])
    assert report["bicubic"]["mean"]["psnr_y"] > 20
    table = (tmp_path / "ablation.md").read_text().splitlines()
    assert len(table) == 2 + 5 and table[2].startswith("| bicubic")
    for name in ("ablation.json", "ablation.png", "L1/metrics.json", "L1/eval.csv", "L1/samples/step_000001.png",
                 "L1_SSIM_PBAN/checkpoint.pt"):
        assert (tmp_path / name).exists(), name


# ---------------------------------------------------------------------------- bad input
def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="holds no images"):
        SRFolderDataset(tmp_path, 2)
    with pytest.raises(ValueError, match="does not exist"):
        SRFolderDataset(tmp_path / "nope", 2)


def test_image_smaller_than_crop(tmp_path):
    write_image(tmp_path / "small.png", torch.rand(3, 40, 48))
    with pytest.raises(ValueError, match=r"small.png is 40x48, smaller than the 64x64 crop"):
        SRFolderDataset(tmp_path, 2, patch_size=64)


def test_scale_not_dividing_hr(tmp_path):
    write_image(tmp_path / "odd.png", torch.rand(3, 50, 66))
    with pytest.raises(ValueError, match=r"odd.png is 50x66, not divisible by the scale 4.*--modcrop"):
        SRFolderDataset(tmp_path, 4, patch_size=32)
    assert SRFolderDataset(tmp_path, 4, modcrop=True)[0]["hr"].shape == (3, 48, 64)
    with pytest.raises(ValueError, match="not divisible"):
        bicubic_downsample(torch.rand(3, 50, 66), 4)
    with pytest.raises(ValueError, match="multiple of the scale"):
        SRFolderDataset(tmp_path, 4, patch_size=30, modcrop=True)


def test_paired_folders_and_mismatches(tmp_path):
    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    hr_dir.mkdir()
    lr_dir.mkdir()
    write_image(hr_dir / "a.png", torch.rand(3, 32, 32))
    write_image(lr_dir / "ax2.png", torch.rand(3, 16, 16))  # DIV2K's naming
    ds = SRFolderDataset(hr_dir, 2, lr_folder=lr_dir, patch_size=16)
    item = ds[(0, [0, 0])]
    assert item["lr"].shape == (3, 8, 8) and item["hr"].shape == (3, 16, 16)
    (lr_dir / "ax2.png").rename(lr_dir / "a.png")
    with pytest.raises(ValueError, match=r"a.png is 16x16 but its HR .*a.png is 32x32; at x4"):
        SRFolderDataset(hr_dir, 4, lr_folder=lr_dir)
    write_image(hr_dir / "b.png", torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="no LR image for .*b.png"):
        SRFolderDataset(hr_dir, 2, lr_folder=lr_dir)


def test_full_res_training_and_mixed_sizes(data_dirs, tiny_pban, tmp_path):
    _, val = data_dirs
    summary = train_sr(_config(data_dirs, tiny_pban, tmp_path, train=str(val), full_res=True, batch_size=1, steps=1))
    assert summary["steps"] == 1
    with pytest.raises(ValueError, match="--batch-size 1"):
        collate([{"lr": torch.rand(3, 8, 8), "hr": torch.rand(3, 16, 16), "name": "a"},
                 {"lr": torch.rand(3, 8, 10), "hr": torch.rand(3, 16, 20), "name": "b"}])


def test_config_errors(data_dirs, tiny_pban, tmp_path):
    with pytest.raises(ValueError, match="--pban-weights"):
        _config(data_dirs, tiny_pban, tmp_path, pban_weights=None).validate()
    with pytest.raises(ValueError, match="at least 32"):
        _config(data_dirs, tiny_pban, tmp_path, patch_size=16).validate()
    with pytest.raises(ValueError, match="nothing to resume"):
        train_sr(_config(data_dirs, tiny_pban, tmp_path / "fresh", resume=True))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from epban.cli import main

    assert main(["train-sr", "--train", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("epban train-sr: error:") and "holds no images" in err[0]


def test_cli_train_sr_runs_the_config_it_was_given(data_dirs, tiny_pban, tmp_path, capsys):
    """``epban train-sr`` builds the same ``SRTrainConfig`` as the API and trains it."""
    from epban.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train-sr", "--help"])
    assert exit_info.value.code == 0
    assert "--pban-weights" in capsys.readouterr().out

    train, _ = data_dirs
    out = tmp_path / "run"
    assert main(["train-sr", "--train", str(train), "--out", str(out), "--net", "tiny", "--scale", "2",
                 "--patch-size", "32", "--batch-size", "2", "--steps", "2", "--lr", "5e-4", "--ssim", "1",
                 "--pban", "0.5", "--pban-weights", str(tiny_pban), "--device", "cpu", "--quiet"]) == 0
    expected = _config(data_dirs, tiny_pban, out, steps=2)
    assert json.loads((out / "config.json").read_text()) == dataclasses.asdict(expected)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert (out / "net.pt").exists() and (out / "checkpoint.pt").exists()


@pytest.fixture(scope="module")
def bad_places(tmp_path_factory):
    """A folder with an image too small to validate at x2, and a file where --out needs a folder."""
    root = tmp_path_factory.mktemp("bad")
    (root / "small").mkdir()
    write_image(root / "small" / "s.png", torch.rand(3, 8, 8))
    (root / "afile").write_text("")
    return root


@pytest.mark.parametrize("extra, expected", [
    (["--val", "{val}", "--sample-crop", "1"], "--sample-crop must be at least the scale 2"),
    (["--val", "{val}", "--sample-crop", "0"], "--sample-crop"),
    (["--val", "{val}", "--sample-crop", "-3"], "--sample-crop"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--l1", "inf"], "--l1 inf"),
    (["--val", "{val}", "--max-val-images", "0"], "--max-val-images"),
    (["--val", "{val}", "--max-val-images", "-1"], "--max-val-images"),
    (["--stop-at", "0"], "--stop-at"),
    (["--stop-at", "-2"], "--stop-at"),
    (["--val-lr", "{val}"], "--val-lr"),
    (["--seed", "-1"], "--seed"),
    (["--workers", "-1"], "--workers"),
    (["--steps", "0"], "--steps"),
    (["--val", "{bad}/nosuch"], "--val folder"),
    (["--train", "{bad}/nosuch"], "--train folder"),
    (["--val", "{bad}/small"], "s.png is 8x8"),
    (["--out", "{bad}/afile/x"], "--out"),
    (["--pban", "0.5", "--pban-weights", "no-such-weights"], "--pban-weights no-such-weights"),
    (["--patch-size", "8", "--ssim", "1"], "--patch-size 8"),
])
def test_bad_options_are_refused_at_start_naming_the_option(data_dirs, bad_places, tmp_path, capsys, extra, expected):
    """Each bad option stops the run before anything is written, in one line that names it."""
    _, val = data_dirs
    out = tmp_path / "out"
    extra = [e.format(val=val, bad=bad_places) for e in extra]
    assert expected in _cli_error(capsys, [*_argv(data_dirs, out), *extra])
    assert not out.exists()


def test_pban_weights_takes_bundled_names(data_dirs, tmp_path):
    """--pban-weights tiny-ssim is the bundled metric, as for ``epban score --weights``."""
    from epban.cli import main

    assert main(_argv(data_dirs, tmp_path / "run", "--steps", "1", "--pban", "0.5", "--pban-weights", "tiny-ssim")) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["pban_weights"] == "tiny-ssim"


def test_ablation_checks_every_setting_before_the_first(data_dirs, tiny_pban, tmp_path):
    """A PBAN weight that needs larger crops stops the ablation before L1 trains."""
    _, val = data_dirs
    cfg = _config(data_dirs, tiny_pban, tmp_path / "abl", patch_size=16, pban=0.0, ssim=0.0, val=str(val))
    with pytest.raises(ValueError, match="at least 32 pixels, got --patch-size 16"):
        run_ablation(cfg, ssim_weight=1.0, pban_weight=0.1)
    assert not (tmp_path / "abl").exists()


def test_ablation_resume_continues_started_settings_and_starts_the_rest(data_dirs, tiny_pban, tmp_path):
    from epban.sr.trainer import _ablation_settings

    cfg = _config(data_dirs, tiny_pban, tmp_path, resume=True)
    (tmp_path / "L1").mkdir()
    (tmp_path / "L1" / "checkpoint.pt").write_bytes(b"")
    settings = _ablation_settings(cfg, 1.0, 0.5)
    assert [(c.resume, c.overwrite) for c in settings.values()] == [(True, False)] + [(False, True)] * 3
    fresh = _ablation_settings(dataclasses.replace(cfg, resume=False), 1.0, 0.5)
    assert [(c.resume, c.overwrite) for c in fresh.values()] == [(False, False)] * 4
    _, val = data_dirs
    with pytest.raises(ValueError, match="nothing to resume"):
        run_ablation(_config(data_dirs, tiny_pban, tmp_path / "new", resume=True, val=str(val)))


def test_resume_from_a_damaged_checkpoint_is_one_message(data_dirs, tmp_path, capsys):
    from epban.cli import main

    run = tmp_path / "run"
    assert main(_argv(data_dirs, run, "--stop-at", "1")) == 0
    ckpt = run / "checkpoint.pt"
    good = ckpt.read_bytes()
    state = torch.load(ckpt, weights_only=False)
    damages = {
        "truncated": lambda: ckpt.write_bytes(good[: len(good) // 2]),
        "empty": lambda: ckpt.write_bytes(b""),
        "random bytes": lambda: ckpt.write_bytes(np.random.default_rng(0).bytes(4096)),
        "an empty dict": lambda: torch.save({}, ckpt),
        "a list": lambda: torch.save([1, 2], ckpt),
        "no config": lambda: torch.save({k: v for k, v in state.items() if k != "config"}, ckpt),
        "a bad config": lambda: torch.save(state | {"config": "edsr"}, ckpt),
        "other weights": lambda: torch.save(state | {"net": {"w": torch.zeros(1)}}, ckpt),
        "bad RNG states": lambda: torch.save(state | {"rng": {"torch": 3}}, ckpt),
    }
    for name, damage in damages.items():
        damage()
        assert "checkpoint.pt" in _cli_error(capsys, _argv(data_dirs, run, "--resume")), name


def test_resume_with_other_training_options_is_refused(data_dirs, tmp_path, capsys):
    """Options that define the training must equal the checkpoint's (each difference listed with
    both values); --steps below the checkpoint's step and --stop-at at or before it are refused;
    options of how the run is watched may change."""
    from epban.cli import main

    run = tmp_path / "run"
    assert main(_argv(data_dirs, run, "--steps", "3", "--stop-at", "2")) == 0
    files = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    err = _cli_error(capsys, _argv(data_dirs, run, "--steps", "3", "--resume", "--lr", "1", "--l1", "2"))
    assert "--lr 1.0 (checkpoint: 0.0002)" in err and "--l1 2.0 (checkpoint: 1.0)" in err
    err = _cli_error(capsys, _argv(data_dirs, run, "--steps", "1", "--resume"))
    assert "--steps 1 (checkpoint: 3)" in err
    assert "--stop-at 2" in _cli_error(capsys, _argv(data_dirs, run, "--steps", "3", "--resume", "--stop-at", "2"))
    for extra in (["--ssim", "1"], ["--seed", "1"], ["--batch-size", "1"]):
        assert extra[0] in _cli_error(capsys, _argv(data_dirs, run, "--steps", "3", "--resume", *extra)), extra
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    assert main(_argv(data_dirs, run, "--steps", "3", "--resume", "--log-every", "1", "--eval-every", "5")) == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 3


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(data_dirs, tmp_path, capsys):
    """A learning rate that makes the loss non-finite stops the run (exit 2, naming the step and
    --lr) before it logs, validates or saves anything non-finite."""
    _, val = data_dirs
    run = tmp_path / "run"
    err = _cli_error(capsys, _argv(data_dirs, run, "--lr", "1e6", "--steps", "6", "--save-every", "1",
                                   "--log-every", "1", "--val", str(val), "--eval-every", "1"))
    first = int(re.search(r"not finite from step (\d+)", err).group(1))
    assert "--lr" in err and first > 1
    assert not (run / "net.pt").exists() and not (run / "metrics.json").exists()
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == first - 1
    assert all(torch.isfinite(w).all() for w in state["net"].values())
    assert [int(r["step"]) for r in _csv(run / "log.csv")] == list(range(1, first))
    assert all(np.isfinite(float(r["loss"])) for r in _csv(run / "log.csv"))
    assert [int(r["step"]) for r in _csv(run / "eval.csv")] == list(range(1, first))


def test_train_sr_script_is_the_command():
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_sr.py"), "--help"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "train-sr" in result.stdout and "--ablation" in result.stdout


# ---------------------------------------------------------------------------- the demo
def test_demo_runs_end_to_end_with_a_stub_metric_trainer(tmp_path, monkeypatch, tiny_pban):
    """The demo's own path (SR data, training, figures, metrics.json) with epban.metric stubbed."""
    stub = types.ModuleType("epban.metric")
    stub.make_toy_dataset = lambda out_dir, *, seed=0, quiet=False: Path(out_dir) / "manifest.csv"
    stub.train_metric = lambda data, **kw: tiny_pban
    monkeypatch.setitem(sys.modules, "epban.metric", stub)
    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    monkeypatch.setattr(demo, "VAL_CROPS", {"chelsea": (20, 100, 64)})
    monkeypatch.setattr(demo, "TRAIN_PHOTOS", ("coffee",))
    out = tmp_path / "demo_out"
    assert demo.main(["--out", str(out), "--sr-steps", "2", "--patch-size", "32", "--device", "cpu"]) == 0
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert {"bicubic", "before", "after", "note"} <= set(metrics)
    assert "SYNTHETIC" in metrics["note"]
    assert (out / "comparison.png").stat().st_size > 0
    # A second run replaces the first; a folder the demo did not write is refused.
    assert demo.main(["--out", str(out), "--sr-steps", "2", "--patch-size", "32", "--device", "cpu"]) == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not written by the demo"):
        demo.main(["--out", str(other), "--sr-steps", "2", "--device", "cpu"])
    assert (other / "notes.txt").read_text() == "keep"


def test_pban_modes_train_alike(data_dirs, tiny_pban, tmp_path):
    """The loss mode (the default) is the model's function: the same loss and gradient for a
    batch, and one training step from the same start moves the network alike (Adam's first
    step is ~lr * sign(gradient): 1% of lr separates agreement from a wrong gradient)."""
    from epban.sr.trainer import pban_loss_mode

    cfg = _config(data_dirs, tiny_pban, tmp_path)
    ds = SRFolderDataset(cfg.train, cfg.scale, patch_size=cfg.patch_size)
    batch = collate([ds[key] for key in StepSampler(len(ds), 2, 1, seed=5)])
    torch.manual_seed(0)
    sr = build_network("tiny", 2)(batch["lr"]).detach()
    losses, grads = [], []
    for mode in (False, True):
        x = sr.clone().requires_grad_()
        loss, _ = SRLoss(cfg.l1, cfg.ssim, cfg.pban, pban_model=cfg.pban_weights, pban_loss_mode=mode)(x, batch["hr"])
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, x)[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert (grads[1] - grads[0]).abs().max() <= 1e-4 * grads[0].abs().max()

    nets = {}
    for mode in ("fast", "reference"):
        train_sr(_config(data_dirs, tiny_pban, tmp_path / mode, steps=1, pban_mode=mode))
        nets[mode] = _load(tmp_path / mode / "net.pt")
    for k in nets["fast"]:
        torch.testing.assert_close(nets["fast"][k], nets["reference"][k], rtol=0, atol=0.01 * cfg.lr)
    assert cfg.pban_mode == "fast"
    assert pban_loss_mode(_config(data_dirs, tiny_pban, tmp_path, pban_mode="reference"), torch.device("cpu")) is False
    assert pban_loss_mode(_config(data_dirs, tiny_pban, tmp_path, pban_mode="fast-bf16"),
                          torch.device("cuda")) == {"dtype": torch.bfloat16, "cuda_graph": True}
    assert pban_loss_mode(_config(data_dirs, tiny_pban, tmp_path, full_res=True),
                          torch.device("cuda"))["cuda_graph"] is False
    with pytest.raises(ValueError, match="pban_mode"):
        _config(data_dirs, tiny_pban, tmp_path, pban_mode="fastest").validate()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_training_with_the_graphed_loss_mode(data_dirs, tiny_pban, tmp_path, monkeypatch):
    """On CUDA the default PBAN loss is the loss mode under CUDA graphs (fixed crops): a few
    steps train (finite weights), and the first step moves the network as the reference does
    (TF32 off, so that both sides compute in float32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for steps in (3, 1):
        nets = {}
        for mode in ("fast", "reference"):
            out = tmp_path / f"{mode}{steps}"
            train_sr(_config(data_dirs, tiny_pban, out, steps=steps, device="cuda", amp=False, pban_mode=mode))
            nets[mode] = _load(out / "net.pt")
        assert all(torch.isfinite(w).all() for w in nets["fast"].values())
    for k in nets["fast"]:
        torch.testing.assert_close(nets["fast"][k], nets["reference"][k], rtol=0, atol=0.05 * 5e-4)
