"""Fine-tuning SR models of other projects through spandrel: load, fine-tune, save, reload; bad model files; --freeze.

The models are spandrel's architectures (and our RRDBNet, whose BasicSR names spandrel reads
as ESRGAN) at tiny sizes with random weights, saved in the layouts their projects use.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

spandrel = pytest.importorskip("spandrel")

# Random weights give outputs far outside [0, 1] (SPAN multiplies by 255): the losses warn once.
# spandrel's SwinIR calls torch.meshgrid without indexing=, which PyTorch warns about.
pytestmark = [pytest.mark.filterwarnings("ignore:SRLoss. sr of the first batch"),
              pytest.mark.filterwarnings("ignore:torch.meshgrid"), pytest.mark.usefixtures("one_thread")]

from epban.imageio import write_image  # noqa: E402
from epban.sr import SRTrainConfig, load_spandrel, train_sr  # noqa: E402
from epban.sr.networks import RRDBNet  # noqa: E402
from epban.training import checkpoint  # noqa: E402


def _photo(top: int, left: int, side: int) -> torch.Tensor:
    import skimage.data

    a = skimage.data.astronaut()[top : top + side, left : left + side]
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two 48x48 HR training photos and one 32x32 validation photo (x2)."""
    root = tmp_path_factory.mktemp("spandrel_data")
    train, val = root / "train", root / "val"
    train.mkdir()
    val.mkdir()
    write_image(train / "a.png", _photo(100, 180, 48))
    write_image(train / "b.png", _photo(300, 260, 48))
    write_image(val / "v.png", _photo(200, 200, 32))
    return train, val


def _models():
    """name -> (module, file suffix, wrapping key): the layouts these projects save in."""
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.SPAN import SPAN
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(0)
    return {
        # Real-ESRGAN / BasicSR: RRDBNet under "params_ema"; spandrel renames it to its old ESRGAN layout
        "ESRGAN": (RRDBNet(scale=2, num_feat=16, num_block=1, num_grow_ch=32), ".pth", "params_ema"),
        "SwinIR": (SwinIR(img_size=16, embed_dim=12, depths=[2], num_heads=[2], window_size=4, mlp_ratio=2.0,
                          upscale=2, img_range=1.0, upsampler="pixelshuffledirect"), ".safetensors", None),
        "SPAN": (SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2), ".pth", None),
        "Compact": (Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2), ".pth", None),
    }


def _save(state: dict, path, wrapper=None):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({wrapper: state} if wrapper else state, path)
    return path


def _file_state(path) -> dict:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("spandrel_models")
    files = {}
    for arch, (module, suffix, wrapper) in _models().items():
        files[arch] = (_save(module.state_dict(), root / f"{arch}{suffix}", wrapper), wrapper)
    return files


def _config(data, out, net_weights, **kw) -> SRTrainConfig:
    train, _ = data
    base = dict(train=str(train), out=str(out), net_weights=str(net_weights), patch_size=16, batch_size=2,
                steps=2, lr=1e-3, l1=1.0, ssim=1.0, eval_every=1000, save_every=1000, device="cpu", quiet=True)
    base.update(kw)
    return SRTrainConfig(**base)


def _eval_output(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(x)


@pytest.mark.parametrize("arch", ["ESRGAN", "SwinIR", "SPAN", "Compact"])
def test_fine_tune_round_trip(arch, data, model_files, tmp_path):
    """Load through spandrel, fine-tune a few steps, save, reload through spandrel: the same
    architecture and state-dict names (and wrapping key) as the input, changed weights, and the
    reloaded model computes what the trained one does."""
    path, wrapper = model_files[arch]
    out = tmp_path / "run"
    kw = {"val": str(data[1])} if arch == "SwinIR" else {}  # whole-image validation through the padding too
    summary = train_sr(_config(data, out, path, **kw))
    assert summary["steps"] == 2 and summary["architecture"] == arch
    saved = out / ("net.safetensors" if path.suffix == ".safetensors" else "net.pth")
    assert summary["net_file"] == saved.name

    before, after = _file_state(path), _file_state(saved)
    if wrapper:
        assert set(after) == {wrapper}
        before, after = before[wrapper], after[wrapper]
    assert set(after) == set(before)
    assert all(after[k].shape == before[k].shape for k in before)
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(after[k], before[k].float())]
    assert len(changed) > len(before) // 2, f"only {changed} changed"

    reloaded = spandrel.ModelLoader().load_from_file(saved)
    assert reloaded.architecture.id == arch and reloaded.scale == 2
    trained = load_spandrel(path).module
    trained.load_state_dict(checkpoint.load_state(out / "checkpoint.pt")["net"])
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(_eval_output(reloaded.model, x), _eval_output(trained, x), rtol=0, atol=1e-6)
    original = spandrel.ModelLoader().load_from_file(path)
    assert not torch.allclose(_eval_output(original.model, x), _eval_output(reloaded.model, x))


def test_freeze_keeps_matching_parameters(data, model_files, tmp_path):
    """--freeze patterns match the file's names (BasicSR's ``body.*``) as well as the model's own."""
    path, wrapper = model_files["ESRGAN"]
    train_sr(_config(data, tmp_path / "run", path, freeze=["body.*", "conv_first.bias"]))
    before = _file_state(path)[wrapper]
    after = _file_state(tmp_path / "run" / "net.pth")[wrapper]
    for k in before:
        frozen = k.startswith("body.") or k == "conv_first.bias"
        assert torch.equal(after[k], before[k]) == frozen, k

    compact, _ = model_files["Compact"]
    train_sr(_config(data, tmp_path / "compact", compact, freeze=["body.0.*"]))
    after = _file_state(tmp_path / "compact" / "net.pth")
    before = _file_state(compact)
    assert torch.equal(after["body.0.weight"], before["body.0.weight"])
    assert not torch.equal(after["body.1.weight"], before["body.1.weight"])

    with pytest.raises(ValueError, match="'nothing.*' matches no parameter"):
        train_sr(_config(data, tmp_path / "bad", compact, freeze=["nothing.*"]))
    with pytest.raises(ValueError, match="freezes every parameter"):
        train_sr(_config(data, tmp_path / "bad", compact, freeze=["*"]))


def test_model_files_that_cannot_be_fine_tuned(data, model_files, tmp_path):
    compact, _ = model_files["Compact"]
    with pytest.raises(ValueError, match=r"x2 Compact model, but the scale asked for is x4"):
        load_spandrel(compact, scale=4)
    with pytest.raises(ValueError, match=r"x2 Compact model, but the scale asked for is x4"):
        train_sr(_config(data, tmp_path / "run", compact, scale=4))
    assert not (tmp_path / "run").exists()

    unknown = _save({"encoder.weight": torch.randn(4, 4), "decoder.bias": torch.randn(4)}, tmp_path / "random.pth")
    with pytest.raises(ValueError, match="random.pth: spandrel does not recognise"):
        load_spandrel(unknown)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth: cannot read as a model file"):
        load_spandrel(garbage)
    with pytest.raises(ValueError, match="not a model file spandrel reads"):
        load_spandrel(data[0] / "a.png")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_spandrel(tmp_path / "missing.pth")

    from spandrel.architectures.Compact import Compact

    gray = _save(Compact(num_in_ch=1, num_out_ch=1, num_feat=8, num_conv=1, upscale=2).state_dict(), tmp_path / "gray.pth")
    with pytest.raises(ValueError, match="1 input and 1 output channels; SR training needs RGB"):
        load_spandrel(gray)


def test_a_model_that_is_not_image_to_image(model_files, monkeypatch):
    """An inpainting model (spandrel's MaskedImageModelDescriptor) is refused."""
    compact, _ = model_files["Compact"]

    def masked(self, state_dict):
        conv = torch.nn.Conv2d(4, 3, 3, padding=1)
        return spandrel.MaskedImageModelDescriptor(
            conv, conv.state_dict(), spandrel.MAIN_REGISTRY["LaMa"].architecture, purpose="Inpainting", tags=[],
            supports_half=False, supports_bfloat16=True, input_channels=3, output_channels=3)

    monkeypatch.setattr(spandrel.ModelLoader, "load_from_state_dict", masked)
    with pytest.raises(ValueError, match=r"LaMa model \(Inpainting\) is not image-to-image"):
        load_spandrel(compact)


def test_cli_fine_tunes_and_reports_errors_in_one_line(data, model_files, tmp_path, capsys, monkeypatch):
    from epban.cli import main

    compact, _ = model_files["Compact"]
    train, _ = data
    out = tmp_path / "run"
    common = ["train-sr", "--train", str(train), "--patch-size", "16", "--batch-size", "2", "--steps", "1",
              "--device", "cpu", "--quiet"]
    assert main([*common, "--out", str(out), "--net-weights", str(compact), "--freeze", "body.0.*"]) == 0
    assert spandrel.ModelLoader().load_from_file(out / "net.pth").architecture.id == "Compact"
    capsys.readouterr()

    def one_line_error(args) -> str:
        assert main([*common, "--out", str(tmp_path / "bad"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("epban train-sr: error:"), err
        return err[0]

    assert "scale asked for is x3" in one_line_error(["--net-weights", str(compact), "--scale", "3"])
    assert "not both" in one_line_error(["--net-weights", str(compact), "--net", "tiny"])
    random_file = _save({"w": torch.randn(2, 2)}, tmp_path / "r.pth")
    assert "does not recognise" in one_line_error(["--net-weights", str(random_file)])
    assert "matches no parameter" in one_line_error(["--net-weights", str(compact), "--freeze", "x*"])
    monkeypatch.setitem(sys.modules, "spandrel", None)  # not installed
    assert "pip install 'epban[sr]'" in one_line_error(["--net-weights", str(compact)])
    assert not (tmp_path / "bad").exists()


def test_size_padding_keeps_gradients():
    """A model with size requirements (a minimum side, a multiple) runs on smaller inputs padded
    as spandrel pads them, and its output is cropped back; gradients reach the input."""
    from epban.sr.spandrel_models import SizePadded

    class Nearest(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x):
            self.seen.append(tuple(x.shape[-2:]))
            return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")

    padded = SizePadded(Nearest(), 2, minimum=16, multiple_of=8)
    x = torch.rand(1, 3, 5, 11, requires_grad=True)
    y = padded(x)
    assert padded.net.seen == [(16, 16)] and y.shape == (1, 3, 10, 22)
    torch.testing.assert_close(y, torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 4.0))
    x = torch.rand(1, 3, 24, 16)
    assert padded.padding(24, 16) == (0, 0) and padded(x).shape == (1, 3, 48, 32)
