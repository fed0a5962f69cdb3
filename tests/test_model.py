import json
import math
from pathlib import Path

import pytest
import torch

from epban import EfficientPBAN, PBANConfig
from epban.models import pban as pban_module
from epban.testing import randomise_inference_state

# The names and shapes of the authors' state dict, in their order.
REFERENCE = Path(__file__).parent / "data" / "official_state_dict.json"


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    return EfficientPBAN(PBANConfig.official()).eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = EfficientPBAN(PBANConfig.tiny()).eval()
    _randomise_buffers(model)
    return model


def _randomise_buffers(model):
    """Non-trivial BatchNorm statistics and GMDC offsets, so round trips test real values."""
    randomise_inference_state(model)


def images(b=1, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(b, 3, h, w, generator=g)
    sr = (hr + 0.1 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1)
    return sr, hr


def test_state_dict_names_and_shapes_equal_the_authors(official):
    expected = json.loads(REFERENCE.read_text())
    sd = official.state_dict()
    assert list(sd) == list(expected)
    assert {k: list(v.shape) for k, v in sd.items()} == expected
    assert sum(v.numel() for v in sd.values()) == 31_737_850


def test_layer3_is_one_shared_module(official):
    assert official.layer2_1 is official.layer2_2
    distinct = {id(p) for p in official.parameters()}
    assert sum(official.state_dict()[k].numel() for k in official.state_dict() if k.startswith("layer2_2.")) > 0
    assert len(distinct) == len(list(official.parameters()))


def test_tiny_config_has_the_same_structure(tiny, official):
    strip = lambda names: {n.split(".")[0] for n in names}  # noqa: E731
    assert strip(tiny.state_dict()) == strip(official.state_dict())
    assert sum(p.numel() for p in tiny.parameters()) < 2_000_000


def test_score_shape_and_gradient(tiny):
    sr, hr = images(b=2)
    sr.requires_grad_(True)
    score = tiny(sr, hr)
    assert score.shape == (2,)
    score.sum().backward()
    assert sr.grad is not None and torch.isfinite(sr.grad).all() and sr.grad.abs().sum() > 0


def test_default_scope_is_batch_independent_and_batch_scope_is_not(tiny):
    sr, hr = images(b=3, h=64, w=96, seed=3)
    with torch.no_grad():
        together = tiny(sr, hr)
        alone = torch.stack([tiny(sr[i : i + 1], hr[i : i + 1])[0] for i in range(3)])
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
        # The scope reaches the attention: block2's features change with batch-mates only in "batch".
        nsr, nhr = tiny.normalise(sr, hr)
        f_sr, f_hr = tiny.layer2_1(tiny.stem(nsr)), tiny.layer2_2(tiny.stem(nhr))
        sample_scope = tiny.block2(f_sr, f_hr)[0]
        tiny.block2.sigma_scope = "batch"
        try:
            batch_scope = tiny.block2(f_sr, f_hr)[0]
            single = tiny.block2(f_sr[:1], f_hr[:1])[0]
        finally:
            tiny.block2.sigma_scope = "sample"
    torch.testing.assert_close(single, sample_scope[:1], rtol=1e-5, atol=1e-5)
    assert (batch_scope - sample_scope).abs().max() > 1e-4


@pytest.mark.parametrize("wrap", ["full_checkpoint", "bare", "dataparallel"])
def test_authors_checkpoint_formats_round_trip(tmp_path, official, wrap):
    _randomise_buffers(official)
    sd = official.state_dict()
    if wrap == "full_checkpoint":
        obj = {"model_state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []},
               "scheduler_state_dict": {"step_size": 5, "gamma": 0.5}, "epoch": 7, "best_loss": 0.12}
    elif wrap == "bare":
        obj = sd
    else:
        obj = {"module." + k: v for k, v in sd.items()}
    path = tmp_path / "authors.pth"
    torch.save(obj, path)
    loaded = EfficientPBAN.from_checkpoint(path, preset="official")
    assert loaded.config.sr_mean == pban_module.REALSRQ_SR_MEAN
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    sr, hr = images(h=64, w=64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(sr, hr), official(sr, hr), rtol=0, atol=0)


def test_own_format_round_trip_keeps_config_and_scores(tmp_path, tiny):
    tiny.config.score_range = (1.0, 5.0)
    try:
        tiny.save_pretrained(tmp_path / "ckpt")
    finally:
        tiny.config.score_range = (0.0, 1.0)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = EfficientPBAN.from_checkpoint(tmp_path / "ckpt")
    assert loaded.config.score_range == (1.0, 5.0)
    assert loaded.config.blocks == tiny.config.blocks and loaded.config.name == "tiny"
    assert loaded.layer2_1 is loaded.layer2_2
    sr, hr = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(sr, hr), tiny(sr, hr), rtol=0, atol=0)


def test_missing_and_unknown_keys_are_listed(tmp_path, tiny):
    sd = dict(tiny.state_dict())
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): fc.bias") as err:
        EfficientPBAN.from_checkpoint(tmp_path / "bad.pth", config=PBANConfig.tiny())
    assert "unknown keys (1): extra.weight" in str(err.value)


def test_wrong_shapes_and_non_checkpoints_are_refused(tmp_path):
    narrow = EfficientPBAN(PBANConfig.tiny(blocks=(3, 4, 6), head_widths=(512, 128, 256)))
    torch.save(narrow.state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="shapes differ"):
        EfficientPBAN.from_checkpoint(tmp_path / "tiny.pth", preset="official")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        EfficientPBAN.from_checkpoint(tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError):
        EfficientPBAN.from_checkpoint(tmp_path / "nothing.pth")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        EfficientPBAN.from_checkpoint(tmp_path / "emptydir")


def test_unreadable_checkpoint_files_get_a_short_reason(tmp_path):
    """torch.load's messages run to pages (and an empty file gave none): one short line each."""
    files = {"empty.pth": b"", "random.pth": bytes(range(7, 250)), "image.png": b"\x89PNG\r\n\x1a\n" + bytes(50)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    import numpy as np
    torch.save({"a": np.zeros(3)}, tmp_path / "objects.pth")
    torch.save({"a": torch.zeros(2)}, tmp_path / "whole.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:200])
    expected = {"empty.pth": "the file is empty", "random.pth": "not a PyTorch checkpoint file",
                "image.png": "not a PyTorch checkpoint file", "objects.pth": "objects other than tensors",
                "truncated.pth": "damaged or truncated"}
    for name, reason in expected.items():
        with pytest.raises(ValueError) as info:
            EfficientPBAN.from_checkpoint(tmp_path / name)
        message = str(info.value)
        assert name in message and reason in message and "\n" not in message and len(message) < 250, message


def test_imagenet_backbone_from_a_local_file_only(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    model = EfficientPBAN(PBANConfig.resnet34())
    with pytest.raises(FileNotFoundError, match=pban_module.TORCHVISION_RESNET34_FILE):
        model.load_imagenet_backbone()
    resnet = torchvision.models.resnet34(weights=None)
    path = tmp_path / pban_module.TORCHVISION_RESNET34_FILE
    torch.save(resnet.state_dict(), path)
    model.load_imagenet_backbone(path)
    assert torch.equal(model.stem[0].weight, resnet.conv1.weight)
    assert torch.equal(model.stem[5][3].conv2.weight, resnet.layer2[3].conv2.weight)
    assert torch.equal(model.layer2_2[5].bn2.running_var, resnet.layer3[5].bn2.running_var)
    with pytest.raises(ValueError, match="ResNet-34 backbone"):
        EfficientPBAN(PBANConfig.tiny()).load_imagenet_backbone(path)


def test_imagenet_backbone_refuses_other_files(tmp_path):
    """A file that is not torchvision's ResNet-34 state dict is refused, naming it; none of these
    may load silently in part (a prefixed copy changed nothing, ResNet-18 changed 20 tensors)."""
    import torchvision

    state = torchvision.models.resnet34(weights=None).state_dict()
    cases = {
        "prefixed.pth": {"module." + k: v for k, v in state.items()},
        "wrapped.pth": {"state_dict": state},
        "resnet18.pth": torchvision.models.resnet18(weights=None).state_dict(),
    }
    model = EfficientPBAN(PBANConfig.resnet34())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match=name):
            model.load_imagenet_backbone(tmp_path / name)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        model.load_imagenet_backbone(tmp_path / "junk.pth")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_config_must_be_a_config_and_save_needs_a_directory(tmp_path):
    for bad in ({"stem_width": 16}, "tiny"):
        with pytest.raises(ValueError, match="PBANConfig"):
            EfficientPBAN(bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        EfficientPBAN(PBANConfig.tiny()).save_pretrained(tmp_path / "file")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda sr, hr: (sr[0], hr[0]), "4-D"),
        (lambda sr, hr: (sr[:, :1], hr[:, :1]), "3 \\(RGB\\) channels"),
        (lambda sr, hr: (sr, hr[..., :48]), "same shape"),
        (lambda sr, hr: (sr[..., :16, :16], hr[..., :16, :16]), "at least 32x32"),
        (lambda sr, hr: ((sr * 255).to(torch.uint8), (hr * 255).to(torch.uint8)), "floating-point"),
        (lambda sr, hr: (sr.to("meta"), hr), "same device"),
        (lambda sr, hr: (sr.index_fill(3, torch.tensor([5]), float("nan")), hr), "NaN"),
        (lambda sr, hr: (sr, hr.index_fill(2, torch.tensor([1]), float("inf"))), "NaN or infinite"),
        (lambda sr, hr: (sr[:0], hr[:0]), "no image \\(batch size 0"),
        (lambda sr, hr: (255 * sr, 255 * hr), "sr has values in .*look like 0..255"),
        (lambda sr, hr: (sr, 2 * hr), "hr has values in .*look like 0..255"),
        (lambda sr, hr: (sr - 1.0, hr), "sr has values in \\[-1"),
    ],
)
def test_bad_inputs_raise_value_error(tiny, make, message):
    sr, hr = images()
    with pytest.raises(ValueError, match=message):
        tiny(*make(sr, hr))


def test_check_finite_can_be_skipped(tiny):
    sr, hr = images()
    sr[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        assert torch.isnan(tiny(sr, hr, check_finite=False)).all()
        assert torch.isfinite(tiny(255 * sr.nan_to_num(), 255 * hr, check_finite=False)).all()


def test_value_check_is_one_reduction_and_one_sync(tiny, monkeypatch):
    """Finite values and the range come from one min/max reduction per image batch, read
    together; an overshoot of [0, 1] within [-0.5, 1.5] is scored."""
    calls = []
    real = pban_module.value_bounds
    monkeypatch.setattr(pban_module, "value_bounds", lambda *t: calls.append(len(t)) or real(*t))
    sr, hr = images()
    with torch.no_grad():
        tiny(1.4 * sr - 0.2, hr)
        assert calls == [2]
        tiny(sr, hr, check_finite=False)
        assert calls == [2]
    assert pban_module.value_bounds(torch.tensor([[0.5, -2.0]]), torch.tensor([float("nan"), 1.0]))[0] == (-2.0, 0.5)
    assert all(math.isnan(v) for v in pban_module.value_bounds(torch.tensor([float("nan"), 1.0]))[0])


def test_float64_and_bfloat16_inputs_are_scored_in_the_models_dtype(tiny):
    sr, hr = images(b=2)
    with torch.no_grad():
        expected = tiny(sr, hr)
        torch.testing.assert_close(tiny(sr.double(), hr.double()), expected, rtol=0, atol=0)
        assert tiny(sr.bfloat16(), hr).dtype == torch.float32
    x = sr.double().requires_grad_(True)
    tiny(x, hr.double()).sum().backward()
    assert x.grad.dtype == torch.float64 and torch.isfinite(x.grad).all()


def test_score_direction_and_range(tiny):
    assert EfficientPBAN.higher_is_better is True and tiny.higher_is_better and not tiny.lower_better
    assert tiny.score_range == (0.0, 1.0)
    assert EfficientPBAN(PBANConfig.tiny(score_range=(1, 5))).score_range == (1, 5)


def test_config_validation():
    with pytest.raises(ValueError, match="sigma_scope"):
        PBANConfig.tiny(sigma_scope="global")
    with pytest.raises(ValueError, match="unknown config preset"):
        PBANConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown PBANConfig fields"):
        PBANConfig.from_dict({"width": 3})


@pytest.mark.parametrize(
    "field, value",
    [
        ("stem_width", 0), ("stem_width", -4), ("stem_width", 6), ("stem_width", 8.0), ("stem_width", True),
        ("blocks", (0, 0, 0)), ("blocks", (1, 1)), ("blocks", (1, 1, 1.5)), ("blocks", 3),
        ("gmdc_kernel_sizes", (2, 4)), ("gmdc_kernel_sizes", (3, 4)), ("gmdc_kernel_sizes", ()),
        ("gmdc_kernel_sizes", (3, 5, 7)), ("gmdc_kernel_sizes", (-3,)),
        ("pixel_gate_width", 0), ("head_widths", (64, 0, 32)), ("head_widths", (64, 32)),
        ("dropout", (0.5,)), ("dropout", (0.5, 1.5)), ("dropout", (float("nan"), 0.1)), ("dropout", 0.3),
        ("sr_mean", (0.5, 0.5)), ("hr_std", (0.2, 0.0, 0.2)), ("sr_std", (0.2, float("inf"), 0.2)),
        ("score_range", (1.0, 1.0)), ("score_range", (0.0, float("inf"))), ("score_range", (1.0,)),
        ("name", 3),
    ],
)
def test_config_fields_are_checked_when_made(field, value):
    """Each fault is a ValueError naming the field, at construction (not a raw error in a
    layer, an IndexError, or a model that cannot score)."""
    with pytest.raises(ValueError, match=f"PBANConfig.{field} must be"):
        PBANConfig.tiny(**{field: value})
    with pytest.raises(ValueError, match=f"PBANConfig.{field} must be"):
        PBANConfig.from_dict({**PBANConfig.tiny().to_dict(), field: value})


def test_config_lists_become_tuples():
    config = PBANConfig.tiny(blocks=[1, 2, 1], gmdc_kernel_sizes=[3, 5])
    assert config.blocks == (1, 2, 1) and config.gmdc_kernel_sizes == (3, 5)
    assert PBANConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ------------------------------------------------------------ malformed checkpoint folders


@pytest.fixture
def folder(tmp_path, tiny):
    return tiny.save_pretrained(tmp_path / "ckpt")


def _edit_config(folder, edit):
    path = folder / pban_module.CONFIG_FILE
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(edit(meta)))


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]),
         "model.safetensors", "not a readable safetensors file"),
        (lambda f: (f / "model.safetensors").write_bytes(b"not a tensor file"),
         "model.safetensors", "not a readable safetensors file"),
        (lambda f: (f / "config.json").write_text('{"format": "epban.EfficientPBAN",'), "config.json", "not valid JSON"),
        (lambda f: (f / "config.json").write_bytes(b"\xff\xfe\x00"), "config.json", "not valid JSON"),
        (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json", "expected a JSON object.*got a list"),
        (lambda f: _edit_config(f, lambda m: {k: v for k, v in m.items() if k != "config"}),
         "config.json", "no 'config' entry"),
        (lambda f: _edit_config(f, lambda m: {**m, "config": [16, 1]}), "config.json", "dict of its fields"),
        (lambda f: _edit_config(f, lambda m: {**m, "config": {**m["config"], "stem_width": 0}}),
         "config.json", "PBANConfig.stem_width"),
        (lambda f: _edit_config(f, lambda m: {**m, "config": {**m["config"], "width": 3}}),
         "config.json", "unknown PBANConfig fields"),
        (lambda f: _edit_config(f, lambda m: {**m, "format_version": 99}), "config.json", "format_version 99"),
        (lambda f: _edit_config(f, lambda m: {k: v for k, v in m.items() if k != "format_version"}),
         "config.json", "format_version None"),
        (lambda f: _edit_config(f, lambda m: {**m, "format": "other"}), "config.json", "not an epban.EfficientPBAN"),
        (lambda f: _edit_config(f, lambda m: {**m, "config": {**m["config"], "head_widths": [64, 32, 16]}}),
         "model.safetensors", "shapes differ"),
    ],
    ids=["truncated_weights", "foreign_weights", "invalid_json", "not_utf8", "json_list", "no_config",
         "config_list", "bad_field", "unknown_field", "format_version_99", "no_format_version", "other_format",
         "weights_of_another_config"],
)
def test_malformed_checkpoint_folders_name_the_file(folder, damage, file, message):
    damage(folder)
    with pytest.raises(ValueError, match=message) as err:
        EfficientPBAN.from_checkpoint(folder)
    assert str(folder / file) in str(err.value)


def test_checkpoint_folder_refuses_preset_and_config(folder):
    with pytest.raises(ValueError, match="carries its own config"):
        EfficientPBAN.from_checkpoint(folder, preset="official")
    with pytest.raises(ValueError, match="carries its own config"):
        EfficientPBAN.from_checkpoint(folder, config=PBANConfig.tiny())
    assert EfficientPBAN.from_checkpoint(folder).config.name == "tiny"


def test_score_equals_an_independent_transcription_of_the_authors_network(tmp_path, official):
    """Batch size 1 (the authors' protocol), their checkpoint format and normalisation: same score to 1e-5."""
    from authors_forward import authors_forward

    _randomise_buffers(official)
    with torch.no_grad():
        for p in official.block2.parameters():  # larger attention inputs, so the block matters
            p.mul_(2.0)
    torch.save({"model_state_dict": official.state_dict(), "epoch": 3}, tmp_path / "authors.pth")
    model = EfficientPBAN.from_checkpoint(tmp_path / "authors.pth", preset="official")
    sd = model.state_dict()
    for seed in range(2):
        sr, hr = images(h=80, w=112, seed=seed)
        mean = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
        nsr = (sr - mean(pban_module.REALSRQ_SR_MEAN)) / mean(pban_module.REALSRQ_SR_STD)
        nhr = (hr - mean(pban_module.REALSRQ_HR_MEAN)) / mean(pban_module.REALSRQ_HR_STD)
        with torch.no_grad():
            torch.testing.assert_close(model(sr, hr), authors_forward(sd, nsr, nhr), rtol=1e-5, atol=1e-5)
