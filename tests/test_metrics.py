"""epban.metrics: PBANScore and SSIMScore as torchmetrics metrics, in one process and under DDP (with the
SR trainer's validation, which goes through them)."""
from __future__ import annotations

import os
import socket
import sys

import pytest
import torch

pytest.importorskip("torchmetrics")

from epban import EfficientPBAN, PBANConfig, ssim  # noqa: E402
from epban.imageio import write_image  # noqa: E402
from epban.metrics import PBANScore, SSIMScore  # noqa: E402
from epban.sr import SRFolderDataset, build_network, evaluate  # noqa: E402
from epban.training.distributed import DistContext  # noqa: E402

SIZE = 48
BATCHES = (2, 3, 1)  # uneven, so a mean of batch means would differ from the mean over images


def make_model(seed=0) -> EfficientPBAN:
    torch.manual_seed(seed)
    return EfficientPBAN(PBANConfig.tiny(score_range=(1.0, 5.0))).eval()


def batches(seed=0, sizes=BATCHES):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        hr = torch.rand(b, 3, SIZE, SIZE, generator=g)
        sr = (hr + 0.1 * torch.randn(hr.shape, generator=g)).clamp(0, 1)
        out.append((sr, hr))
    return out


def direct_means(model, data):
    """The mean over every image of the model's score and of SSIM, computed directly."""
    with torch.no_grad():
        pban = torch.cat([model(sr, hr) for sr, hr in data])
    ssims = torch.cat([ssim(sr, hr, reduction="none") for sr, hr in data])
    return pban.mean(), ssims.mean()


@pytest.fixture(scope="module")
def model():
    return make_model()


def test_values_equal_the_direct_computation(model):
    data = batches()
    pban_metric, ssim_metric = PBANScore(model), SSIMScore()
    for sr, hr in data:
        pban_metric.update(sr, hr)
        ssim_metric.update(sr, hr)
    pban_mean, ssim_mean = direct_means(model, data)
    torch.testing.assert_close(pban_metric.compute(), pban_mean)
    torch.testing.assert_close(ssim_metric.compute(), ssim_mean)
    assert int(pban_metric.count) == int(ssim_metric.count) == sum(BATCHES)
    batch_means = torch.stack([ssim(sr, hr) for sr, hr in data]).mean()
    assert not torch.allclose(ssim_mean, batch_means)  # the data does tell the two means apart


def test_ssim_options_reach_the_kernel():
    (sr, hr), = batches(sizes=(2,))
    metric = SSIMScore(data_range=2.0, win_size=7, sigma=1.0, padding="same")
    metric.update(sr, hr)
    expected = ssim(sr, hr, data_range=2.0, win_size=7, sigma=1.0, padding="same")
    torch.testing.assert_close(metric.compute(), expected)


def test_reset(model):
    first, second = batches(seed=1, sizes=(2,)), batches(seed=2, sizes=(3,))
    for metric in (PBANScore(model), SSIMScore()):
        metric.update(*first[0])
        metric.compute()
        metric.reset()
        assert int(metric.count) == 0 and float(metric.value_sum) == 0.0
        metric.update(*second[0])
        fresh = type(metric)(model) if isinstance(metric, PBANScore) else SSIMScore()
        fresh.update(*second[0])
        torch.testing.assert_close(metric.compute(), fresh.compute())


def test_metric_flags():
    for cls in (PBANScore, SSIMScore):
        assert cls.higher_is_better is True
        assert cls.is_differentiable is True
        assert cls.full_state_update is False


def test_batch_value_is_differentiable_and_update_is_not(model):
    (sr, hr), = batches(sizes=(2,))
    for metric in (PBANScore(model), SSIMScore()):
        x = sr.clone().requires_grad_()
        value = metric(x, hr)  # the batch's value, and the batch added to the state
        value.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        assert not metric.value_sum.requires_grad
        metric.update(x, hr)
        assert not metric.value_sum.requires_grad
        assert int(metric.count) == 4


def test_pban_score_leaves_the_model_as_it_is(tmp_path):
    model = make_model().train()
    metric = PBANScore(model)
    assert model.training and all(p.requires_grad for p in model.parameters())
    metric.train()
    assert not metric.model.training  # scored in eval mode whatever the parent module's mode
    assert not any(p.requires_grad for p in metric.model.parameters())
    (sr, hr), = batches(sizes=(2,))
    metric.update(sr, hr)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(metric.compute(), model(sr, hr).mean())
    model.save_pretrained(tmp_path / "pban")  # a checkpoint path gives the same scores
    from_path = PBANScore(tmp_path / "pban")
    from_path.update(sr, hr)
    torch.testing.assert_close(from_path.compute(), metric.compute())


def test_pban_score_checks_inputs(model):
    sr, hr = batches(sizes=(1,))[0]
    metric = PBANScore(model)
    with pytest.raises(ValueError):
        metric.update(sr, hr[..., :-1])
    with pytest.raises(ValueError):
        metric.update(sr.clone().fill_(float("nan")), hr)
    PBANScore(model, check_finite=False).update(sr.clone().fill_(float("nan")), hr)


# ----------------------------------------------------------------------------- DDP
WORLD = 2
SHARDS = {0: (0, 2), 1: (1,)}  # rank -> indices into batches(): rank 0 sees 2 + 1 images, rank 1 sees 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sr_evaluate(directory: str, ctx=None) -> dict:
    """``epban.sr.evaluate`` of a tiny SR network on the three images under ``directory/val``."""
    torch.manual_seed(0)
    net = build_network("tiny", 2)
    val = SRFolderDataset(os.path.join(directory, "val"), 2, augment=False)
    return evaluate(net, val, "cpu", 2, scorer=EfficientPBAN.from_checkpoint(os.path.join(directory, "pban")), ctx=ctx)


def _ddp_worker(rank: int, port: int, directory: str) -> None:
    torch.set_num_threads(1)  # two processes on a small CPU: more threads only wait for each other
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        data = batches()
        pban_metric, ssim_metric = PBANScore(os.path.join(directory, "pban")), SSIMScore()
        for i in SHARDS[rank]:
            pban_metric.update(*data[i])
            ssim_metric.update(*data[i])
        local_count = int(pban_metric.count)
        result = dict(pban=pban_metric.compute(), ssim=ssim_metric.compute(), local_count=local_count,
                      count_after=int(pban_metric.count))
        # SR validation: each rank scores its share of the images, through the metrics, then without torchmetrics
        ctx = DistContext(rank=rank, world_size=WORLD)
        result["sr_eval"] = _sr_evaluate(directory, ctx)
        saved, sys.modules["epban.metrics"] = sys.modules["epban.metrics"], None  # `from epban.metrics import` fails
        try:
            result["sr_eval_plain"] = _sr_evaluate(directory, ctx)
        finally:
            sys.modules["epban.metrics"] = saved
        torch.save(result, os.path.join(directory, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_synced_mean_equals_the_single_process_mean(tmp_path, model):
    assert sorted(i for shard in SHARDS.values() for i in shard) == list(range(len(BATCHES)))
    model.save_pretrained(tmp_path / "pban")
    (tmp_path / "val").mkdir()
    g = torch.Generator().manual_seed(3)
    for name in ("v0", "v1", "v2"):  # three validation images: rank 0 scores two, rank 1 one
        write_image(tmp_path / "val" / f"{name}.png", torch.rand(3, 64, 64, generator=g))
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    pban_mean, ssim_mean = direct_means(EfficientPBAN.from_checkpoint(tmp_path / "pban"), batches())
    single = _sr_evaluate(str(tmp_path))
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["local_count"] == sum(BATCHES[i] for i in SHARDS[rank])
        assert result["count_after"] == result["local_count"]  # compute() syncs, then restores the local state
        torch.testing.assert_close(result["pban"], pban_mean)
        torch.testing.assert_close(result["ssim"], ssim_mean)
        # every rank gets the single-process validation: all images, in order, and their means
        for key in ("sr_eval", "sr_eval_plain"):
            assert list(result[key]["images"]) == list(single["images"]) == ["v0", "v1", "v2"]
            assert list(result[key]["mean"]) == list(single["mean"]) == ["psnr_y", "ssim_y", "pban_score"]
            for column, value in single["mean"].items():
                assert result[key]["mean"][column] == pytest.approx(value, rel=1e-6), (key, column)
                for name, row in single["images"].items():
                    assert result[key]["images"][name][column] == pytest.approx(row[column], rel=1e-6)
