import csv

import numpy as np
import pytest
from PIL import Image

from epban.cli import main


def write(path, array):
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    from skimage import data

    hr = data.astronaut()[::4, ::4]  # 128x128, a real photo
    rng = np.random.default_rng(0)
    noisy = np.clip(hr + rng.normal(0, 20, hr.shape), 0, 255).astype(np.uint8)
    (tmp_path / "sr").mkdir()
    (tmp_path / "hr").mkdir()
    write(tmp_path / "hr" / "a.png", hr)
    write(tmp_path / "sr" / "a.png", noisy)
    write(tmp_path / "hr" / "b.png", hr[:, ::-1].copy())
    write(tmp_path / "sr" / "b.png", hr[:, ::-1].copy())
    return tmp_path


def test_score_directories_writes_table_and_csv(photos, capsys):
    out = photos / "scores.csv"
    assert main(["score", str(photos / "sr"), str(photos / "hr"), "--csv", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "UNTRAINED" in captured.err
    rows = list(csv.DictReader(out.open()))
    assert [r["image"] for r in rows] == ["a.png", "b.png"]
    assert float(rows[1]["ssim"]) == pytest.approx(1.0)
    assert float(rows[0]["ssim"]) < 0.9
    assert "a.png" in captured.out


def test_score_two_files_with_weights(photos, tmp_path, capsys):
    import torch

    from epban import EfficientPBAN, PBANConfig

    EfficientPBAN(PBANConfig.tiny()).save_pretrained(tmp_path / "w")
    code = main(["score", str(photos / "sr" / "a.png"), str(photos / "hr" / "a.png"),
                 "--weights", str(tmp_path / "w"), "--device", "cpu"])
    assert code == 0
    assert "UNTRAINED" not in capsys.readouterr().err


def test_score_errors_name_the_file(photos, capsys):
    (photos / "sr" / "c.png").write_bytes(b"not an image")
    assert main(["score", str(photos / "sr"), str(photos / "hr"), "--device", "cpu"]) == 2
    assert "c.png" in capsys.readouterr().err
    write(photos / "hr" / "c.png", np.zeros((64, 64, 3), np.uint8))
    assert main(["score", str(photos / "sr"), str(photos / "hr"), "--device", "cpu"]) == 2
    assert "c.png" in capsys.readouterr().err
    write(photos / "sr" / "c.png", np.zeros((32, 64, 3), np.uint8))
    assert main(["score", str(photos / "sr"), str(photos / "hr"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "c.png" in err and "differs" in err
    assert main(["score", str(photos / "nope"), str(photos / "hr")]) == 2
    assert main(["score", str(photos / "sr"), str(photos / "hr"), "--weights", str(photos / "none.pth")]) == 2


def test_info_reports_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("torch", "triton", "extension_built", "ssim", "axial_attention"):
        assert key in out
