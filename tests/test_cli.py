"""The ``epban`` command: ``score`` (tables, weights, batches, bad files, bad arguments), ``info``,
one-line errors with exit status 2, and the thread count."""
import csv

import numpy as np
import pytest
import torch
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


def test_score_without_weights_is_ssim_and_psnr_only(photos, capsys):
    """No metric given: no score from a random network, and it says so."""
    out = photos / "scores.csv"
    assert main(["score", str(photos / "sr"), str(photos / "hr"), "--csv", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "no metric given" in captured.err
    rows = list(csv.DictReader(out.open()))
    assert [r["image"] for r in rows] == ["a.png", "b.png"] and list(rows[0]) == ["image", "ssim", "psnr"]
    assert float(rows[1]["ssim"]) == pytest.approx(1.0) and rows[1]["psnr"] == "inf"
    assert float(rows[0]["ssim"]) < 0.9
    lines = captured.out.splitlines()
    assert lines[0].split() == ["image", "SSIM", "PSNR(dB)"] and "PBAN" not in captured.out
    assert lines[1].startswith("a.png") and any(line.startswith("mean of 2") for line in lines)
    assert "SSIM: higher is better" in captured.out


def test_score_two_files_with_weights(photos, tmp_path, capsys):
    from epban import EfficientPBAN, PBANConfig

    EfficientPBAN(PBANConfig.tiny()).save_pretrained(tmp_path / "w")
    code = main(["score", str(photos / "sr" / "a.png"), str(photos / "hr" / "a.png"),
                 "--weights", str(tmp_path / "w"), "--device", "cpu"])
    assert code == 0
    captured = capsys.readouterr()
    assert "no metric given" not in captured.err
    assert captured.out.splitlines()[0].split() == ["image", "PBAN", "SSIM", "PSNR(dB)"]
    assert "PBAN (" in captured.out and "higher is better; trained on scores in [0, 1]" in captured.out


def test_score_bundled_weights_by_name_in_batches(photos, tmp_path, capsys):
    """``--weights tiny-ssim`` names the bundled weights; the scores do not depend on the batch size."""
    from epban import EfficientPBAN, weights
    from epban.imageio import read_image

    tables = {}
    for batch in (1, 2):
        out = tmp_path / f"b{batch}.csv"
        assert main(["score", str(photos / "sr"), str(photos / "hr"), "--weights", "tiny-ssim", "--device", "cpu",
                     "--batch-size", str(batch), "--csv", str(out)]) == 0
        tables[batch] = list(csv.DictReader(out.open()))
    captured = capsys.readouterr()
    assert "PBAN (tiny-ssim): higher is better" in captured.out and "SSIM estimates" in captured.err
    assert [r["image"] for r in tables[2]] == ["a.png", "b.png"]
    for one, two in zip(tables[1], tables[2]):
        assert float(one["pban"]) == pytest.approx(float(two["pban"]), abs=1e-5)
    model = EfficientPBAN.from_checkpoint(weights.path("tiny-ssim"))
    with torch.no_grad():
        direct = float(model(read_image(photos / "sr" / "a.png")[None], read_image(photos / "hr" / "a.png")[None]))
    assert float(tables[1][0]["pban"]) == pytest.approx(direct, abs=1e-5)
    mean = next(line for line in captured.out.splitlines() if line.startswith("mean of 2"))
    assert float(mean.split()[3]) == pytest.approx(sum(float(r["pban"]) for r in tables[2]) / 2, abs=1e-4)


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
    assert len(err) == 1, err
    return err[0]


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


def test_score_corrupt_file_stops_before_scoring_or_is_skipped(photos, tmp_path, capsys):
    """A truncated PNG (its header intact) stops the run with its name, before any table; with
    --skip-bad it is reported and the others are scored."""
    data = (photos / "sr" / "b.png").read_bytes()
    (photos / "sr" / "b.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "t.csv"
    assert main(["score", str(photos / "sr"), str(photos / "hr"), "--device", "cpu", "--csv", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()
    err = [line for line in captured.err.splitlines() if not line.startswith("note:")]
    assert len(err) == 1 and "b.png" in err[0] and "--skip-bad" in err[0]
    assert main(["score", str(photos / "sr"), str(photos / "hr"), "--device", "cpu", "--csv", str(out),
                 "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert [r["image"] for r in csv.DictReader(out.open())] == ["a.png"]
    assert "skipped: " in captured.err and "b.png" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["--device", "banana"], "argument --device: 'banana' is not a device"),
    (["--device", "cuda:7"], "argument --device: 'cuda:7'"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    (["--threads", "-2"], "argument --threads: expected 'auto' (or 0) or a thread count"),
    (["--weights", "no-such-weights"], "no-such-weights: no such checkpoint (a folder, an authors' .pth file, or "
                                       "the name of bundled weights: tiny-ssim)"),
    (["--csv", "{tmp}/missing/scores.csv"], "folder {tmp}/missing does not exist"),
    (["--csv", "{tmp}"], "is a folder"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_score_bad_arguments_one_line_before_any_work(photos, tmp_path, capsys, monkeypatch, argv, message):
    """Each is one line on stderr, exit status 2, and nothing is printed or written first."""
    import epban.cli

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before checking the arguments")

    monkeypatch.setattr(epban.cli, "_probe", no_scoring)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert _exit_code(["score", str(photos / "sr"), str(photos / "hr")] + argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith("epban") and ": error: " in line and message.replace("{tmp}", str(tmp_path)) in line, line
    assert not (tmp_path / "missing").exists()


def _exit_code(argv) -> int:
    """``main``'s status: returned (our errors) or raised by argparse (its own)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_score_cuda_without_gpu_is_one_line(photos, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _exit_code(["score", str(photos / "sr"), str(photos / "hr"), "--device", "cuda"]) == 2
    assert "no CUDA GPU is available here; use --device cpu" in _one_error_line(capsys)


def test_score_refuses_0_to_255_values_in_one_line(photos, tmp_path, capsys, monkeypatch):
    """The model refuses inputs that look like 0..255 (ValueError); the CLI shows it as one line."""
    import epban.imageio

    read = epban.imageio.read_image
    monkeypatch.setattr(epban.imageio, "read_image", lambda path: read(path) * 255)
    assert main(["score", str(photos / "sr" / "a.png"), str(photos / "hr" / "a.png"), "--weights", "tiny-ssim",
                 "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert "a.png" in line and "0..255" in line


def test_malformed_checkpoint_is_one_line(photos, tmp_path, capsys):
    from epban import EfficientPBAN, PBANConfig

    folder = EfficientPBAN(PBANConfig.tiny()).save_pretrained(tmp_path / "w")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["score", str(photos / "sr"), str(photos / "hr"), "--weights", str(folder), "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("epban score: error: ") and "model.safetensors" in line


def test_progress_bar_only_on_a_terminal(photos, capsys, monkeypatch):
    import sys

    assert main(["score", str(photos / "sr"), str(photos / "hr"), "--device", "cpu", "--batch-size", "1"]) == 0
    assert "scoring" not in capsys.readouterr().err  # not a terminal: no bar in logs
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main(["score", str(photos / "sr"), str(photos / "hr"), "--device", "cpu", "--batch-size", "1"]) == 0
    assert "scoring" in capsys.readouterr().err


def test_threads_option_and_auto_rule(photos, monkeypatch):
    from epban import cli_options

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n, _set=torch.set_num_threads: seen.append(n) or _set(n))
    before = torch.get_num_threads()
    assert main(["score", str(photos / "sr" / "a.png"), str(photos / "hr" / "a.png"), "--threads", "1"]) == 0
    assert seen[0] == 1 and torch.get_num_threads() == before  # set for the command, restored after main()
    # auto: torch's default when the cores are free, the free cores (at least 1) when they are busy
    assert cli_options.auto_threads(2, cpus=2, load=0.2) == 2
    assert cli_options.auto_threads(2, cpus=2, load=1.0) == 1
    assert cli_options.auto_threads(8, cpus=8, load=30.0) == 1
    assert cli_options.auto_threads(4, cpus=8, load=2.0) == 4
    assert cli_options.auto_threads(4, cpus=8, load=None) == 4
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli_options.os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    seen.clear()
    assert cli_options.set_threads(0) == 1 and seen == [1]
    torch.set_num_threads(before)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # set by the user: auto leaves the count alone
    seen.clear()
    assert cli_options.set_threads(0) == before and seen == []


@pytest.mark.parametrize("target", ["hr/a.png", "sr/b.png", "hr/b.png@files", "sr/a.png@files"])
def test_score_csv_never_overwrites_an_input(photos, capsys, target):
    """--csv naming an existing image (in the SR/HR folders, one of the two files or beside
    them) is refused before any work, and the image is left as it was."""
    target, _, mode = target.partition("@")
    sr, hr = (photos / "sr", photos / "hr") if not mode else (photos / "sr" / "b.png", photos / "hr" / "b.png")
    before = (photos / target).read_bytes()
    assert _exit_code(["score", str(sr), str(hr), "--csv", str(photos / target), "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert "--csv" in line and "is an image" in line and target in line
    assert (photos / target).read_bytes() == before


def test_score_csv_beside_the_images_is_written(photos, capsys):
    """A new CSV in the HR folder is not an input: written, and overwritten on the next run."""
    out = photos / "hr" / "scores.csv"
    for _ in range(2):
        assert main(["score", str(photos / "sr"), str(photos / "hr"), "--csv", str(out), "--device", "cpu"]) == 0
        assert [r["image"] for r in csv.DictReader(out.open())] == ["a.png", "b.png"]
    capsys.readouterr()


def test_score_notes_hr_images_without_sr(photos, capsys):
    """HR images with no SR counterpart are not scored, and a note says how many and which."""
    for name in ("c.png", "d.png", "e.png", "f.png"):
        write(photos / "hr" / name, np.zeros((16, 16, 3), np.uint8))
    assert main(["score", str(photos / "sr"), str(photos / "hr"), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert any(line.startswith("mean of 2") for line in captured.out.splitlines())
    note = next(line for line in captured.err.splitlines() if "no SR counterpart" in line)
    assert note.startswith("note: 4 HR image(s)") and "c.png, d.png, e.png, ..." in note and "f.png" not in note
    main(["score", str(photos / "sr" / "a.png"), str(photos / "hr" / "a.png"), "--device", "cpu"])
    assert "no SR counterpart" not in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"random", b"png"])
def test_score_weights_not_a_checkpoint_is_one_line(photos, tmp_path, capsys, content):
    """An empty file, random bytes or an image given as --weights: exit 2, one short line naming it."""
    path = tmp_path / ("w.png" if content == b"png" else "w.pth")
    if content == b"png":
        write(path, np.zeros((16, 16, 3), np.uint8))
    else:
        path.write_bytes(np.random.default_rng(0).bytes(4096) if content else b"")
    assert main(["score", str(photos / "sr"), str(photos / "hr"), "--weights", str(path), "--device", "cpu"]) == 2
    line = _one_error_line(capsys)  # returned, not raised: no traceback
    assert line.startswith("epban score: error: ") and str(path) in line and len(line) < 300, line


def test_ctrl_c_is_one_line_and_status_130(photos, capsys, monkeypatch):
    import epban.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(epban.cli, "_probe", interrupted)
    try:
        code = main(["score", str(photos / "sr"), str(photos / "hr"), "--device", "cpu"])
    except KeyboardInterrupt:  # would stop the whole test session
        pytest.fail("main() let KeyboardInterrupt through")
    assert code == 130
    assert _one_error_line(capsys) == "epban score: interrupted"
