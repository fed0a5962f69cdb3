"""Training and evaluating the metric: outputs, exact resume after Ctrl-C, DDP, the CLI, bad input.

Everything runs the tiny config on 16 pairs per split of a 64x64 toy set, 32x32 crops, a few steps.
"""
import csv
import json
import math
import os
import signal
import socket
import time

import pytest
import torch

from epban.cli import main as epban_main
from epban.data import load_manifest, make_toy_dataset
from epban.models.pban import EfficientPBAN
from epban.metric import TrainingInterrupted, evaluate_metric, train_metric


pytestmark = pytest.mark.usefixtures("one_thread")


FAST = dict(config="tiny", batch_size=4, crop=32, lr=1e-3, num_workers=0, quiet=True)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A 16-pair-per-split subset of the toy set (its images, its SYNTHETIC header)."""
    full = make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", size=64, quiet=True)
    lines = full.read_text().splitlines()
    kept, count = [], {}
    for line in lines:
        split = line.rsplit(",", 1)[-1]
        if line.startswith("#") or line.startswith("sr_path"):
            kept.append(line)
        elif count.get(split, 0) < 16:
            count[split] = count.get(split, 0) + 1
            kept.append(line)
    small = full.parent / "small.csv"
    small.write_text("\n".join(kept) + "\n")
    return small


@pytest.fixture(scope="module")
def run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    losses = []
    best = train_metric(toy, epochs=2, max_steps=6, out=out, callback=losses.append, **FAST)
    return out, best, losses


def test_run_outputs(run, toy):
    out, best, losses = run
    assert best == out / "best"
    for name in ("best", "last"):
        assert (out / name / "model.safetensors").exists() and (out / name / "training.json").exists()
    assert (out / "last" / "training_state.pt").exists() and not (out / "best" / "training_state.pt").exists()
    assert [(r["epoch"], r["step"]) for r in losses] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 5), (1, 6)]
    model = EfficientPBAN.from_checkpoint(best)
    train_scores = [s.score for s in load_manifest(toy) if s.split == "train"]
    assert model.config.score_range == (min(train_scores), max(train_scores))
    info = json.loads((best / "training.json").read_text())
    # best is whichever validated checkpoint (end of epoch 1 at step 4, or the stop at step 6) had the best SRCC
    assert info["synthetic_scores"] is True and info["step"] in (4, 6) and info["val"]["n"] > 0
    assert json.loads((out / "last" / "training.json").read_text())["step"] == 6
    log = (out / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,step,train_loss") and len(log) == 3  # epoch 1, then the stop at step 6
    assert not list(out.glob(".*tmp*"))


def test_trained_beats_untrained(run, toy):
    """Training moves predictions to the score scale and lowers the error of the untrained network."""
    _, best, _ = run
    trained = evaluate_metric(toy, weights=best, split="val", quiet=True, num_workers=0)
    torch.manual_seed(0)
    untrained_dir = best.parent / "untrained"
    EfficientPBAN(EfficientPBAN.from_checkpoint(best).config).save_pretrained(untrained_dir)
    untrained = evaluate_metric(toy, weights=untrained_dir, split="val", quiet=True, num_workers=0)
    assert trained["rmse"] < 0.5 * untrained["rmse"]


def _log(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_after_sigint_equals_uninterrupted(toy, tmp_path):
    """Ctrl-C at step 3 of a 4-step epoch, then --resume: the same losses, and the same log.csv
    (the epoch's train_loss over all its batches; elapsed_s counting on from the interruption)."""
    kwargs = dict(FAST, epochs=2, max_steps=5)
    ref = []
    train_metric(toy, out=tmp_path / "ref", callback=ref.append, **kwargs)
    ref_log = _log(tmp_path / "ref" / "log.csv")

    def interrupt(row):
        time.sleep(0.3)  # elapsed time before the interruption, which the resumed run must count on from
        if row["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted):
        train_metric(toy, out=tmp_path / "cut", callback=interrupt, **kwargs)
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    state = torch.load(tmp_path / "cut" / "last" / "training_state.pt", weights_only=False)
    assert state["step"] == 3
    elapsed_at_cut = state["progress"]["elapsed_s"]
    assert elapsed_at_cut >= 0.9
    assert not (tmp_path / "cut" / "best").exists()  # an interrupted run leaves no "best" pretending to be one
    assert _log(tmp_path / "cut" / "log.csv") == []  # the header only: the folder is a run from its start
    with pytest.raises(FileExistsError, match="resume"):
        train_metric(toy, out=tmp_path / "cut", **kwargs)
    # --overwrite removes what a run writes and keeps the rest
    (tmp_path / "ref" / "notes.txt").write_text("mine")
    (tmp_path / "ref" / ".last.old").mkdir()
    train_metric(toy, out=tmp_path / "ref", overwrite=True, **dict(kwargs, max_steps=1))
    assert json.loads((tmp_path / "ref" / "best" / "training.json").read_text())["step"] == 1
    assert (tmp_path / "ref" / "notes.txt").read_text() == "mine" and not (tmp_path / "ref" / ".last.old").exists()
    assert len(_log(tmp_path / "ref" / "log.csv")) == 1
    resumed = []
    train_metric(toy, out=tmp_path / "cut", resume=True, callback=resumed.append, **kwargs)
    assert [r["step"] for r in resumed] == [4, 5]  # step 4 ends epoch 1: validation, LR step, epoch 2
    for a, b in zip(resumed, ref[3:]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6, rel=0)
    log = _log(tmp_path / "cut" / "log.csv")
    assert [(r["epoch"], r["step"]) for r in log] == [(r["epoch"], r["step"]) for r in ref_log] == [("1", "4"), ("2", "5")]
    for row, want in zip(log, ref_log):
        for key in ("train_loss", "lr", "val_srcc", "val_plcc", "val_krcc", "val_rmse"):
            assert float(row[key]) == pytest.approx(float(want[key]), rel=1e-5, abs=1e-6), key
        assert float(row["elapsed_s"]) >= elapsed_at_cut


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, toy, out, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        best = train_metric(toy, epochs=1, max_steps=2, out=out, device="cpu", **dict(FAST, batch_size=2))
        report = evaluate_metric(toy, weights=best, split="val", device="cpu", quiet=True, num_workers=0)
        queue.put((rank, report["srcc"], report["rmse"]))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one(toy, tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    out = tmp_path / "ddp"
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, toy, out, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0]
    results = sorted(queue.get(timeout=5) for _ in procs)
    single = evaluate_metric(toy, weights=out / "best", split="val", quiet=True, num_workers=0)
    validated = json.loads((out / "best" / "training.json").read_text())["val"]
    for _, srcc, rmse in results:  # metrics gathered across ranks = one process scoring everything
        assert srcc == pytest.approx(single["srcc"], abs=1e-6) and rmse == pytest.approx(single["rmse"], rel=1e-5)
    assert validated["srcc"] == pytest.approx(single["srcc"], abs=1e-6)
    assert validated["n"] == single["n"]


# ----------------------------------------------------------------------------- CLI
def test_cli_eval_metric(run, toy, tmp_path, capsys):
    _, best, _ = run
    out = tmp_path / "eval"
    assert epban_main(["eval-metric", "--data", str(toy), "--split", "test", "--weights", str(best),
                       "--out", str(out), "--quiet", "--workers", "0"]) == 0
    assert "SRCC" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert {"srcc", "krcc", "plcc", "rmse", "logistic", "n", "per_method"} <= set(report)
    assert set(report["logistic"]) == {"srcc", "krcc", "plcc", "rmse", "params"}
    assert report["n"] == sum(s.split == "test" for s in load_manifest(toy))
    assert "bicubic_x4" in report["per_method"] and report["synthetic_scores"] is True
    assert (out / "scatter.png").stat().st_size > 1000
    assert len((out / "predictions.csv").read_text().splitlines()) == report["n"] + 1


def test_cli_make_dataset(tmp_path, capsys):
    assert epban_main(["make-dataset", "--toy", str(tmp_path / "t"), "--size", "32", "--scales", "2"]) == 0
    captured = capsys.readouterr()
    assert "SYNTHETIC" in captured.err and captured.out.strip().endswith("manifest.csv")
    assert epban_main(["make-dataset"]) == 2


@pytest.mark.parametrize("row, message", [
    ("SR/none.png,HR/astronaut.png,50,x,train", "bad.csv:{line}: SR image .*none.png does not exist"),
    ("SR/astronaut_00_nearest_x2.png,HR/astronaut.png,NaN,x,train", "bad.csv:{line}: score 'NaN' is not a finite"),
])
def test_cli_bad_manifest_one_line_no_outputs(toy, tmp_path, capsys, row, message):
    lines = toy.read_text().splitlines()
    lines.insert(5, row)
    bad = toy.parent / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    try:
        out = tmp_path / "run"
        code = epban_main(["train-metric", "--data", str(bad), "--out", str(out), "--epochs", "1", "--quiet"])
    finally:
        bad.unlink()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    import re

    assert re.search(message.format(line=6), err[0]), err[0]
    assert not out.exists()


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_corrupt_val_image_found_before_training(toy, tmp_path, capsys):
    """A truncated image (its header intact) in the val split stops the run before its first
    step, naming the file, with nothing written."""
    lines = toy.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.endswith(",val"))
    fields = lines[index].split(",")
    data = (toy.parent / fields[0]).read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    lines[index] = ",".join([str(cut)] + fields[1:])  # an absolute path
    bad = toy.parent / "bad_val.csv"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    try:
        code = epban_main(["train-metric", "--data", str(bad), "--out", str(out), "--epochs", "1", "--quiet"])
    finally:
        bad.unlink()
    line = _one_line(capsys)
    assert code == 2 and f"bad_val.csv:{index + 1}: SR image {cut} cannot be read" in line, line
    assert not out.exists()


def test_cli_empty_manifest_says_it_is_empty(tmp_path, capsys):
    empty = tmp_path / "m.csv"
    empty.write_text("sr_path,hr_path,score,method,split\n")
    out = tmp_path / "run"
    assert epban_main(["train-metric", "--data", str(empty), "--out", str(out), "--quiet"]) == 2
    line = _one_line(capsys)
    assert "m.csv: the manifest is empty" in line and "split column" not in line, line
    assert not out.exists()


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_cli_out_holding_other_files_is_refused(toy, tmp_path, capsys, flags):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    code = epban_main(["train-metric", "--data", str(toy), "--out", str(out), "--epochs", "1", "--quiet"] + flags)
    line = _one_line(capsys)
    assert code == 2 and "is not empty and holds no epban run (holiday.jpg)" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


def test_cli_unknown_column(tmp_path, capsys):
    bad = tmp_path / "m.csv"
    bad.write_text("sr_path,hr_path,score,mos\n")
    assert epban_main(["eval-metric", "--data", str(bad), "--weights", str(tmp_path)]) == 2
    assert "m.csv:1: unknown column(s) 'mos'" in capsys.readouterr().err


def test_cli_bad_init_one_line_no_outputs(toy, tmp_path, capsys):
    out = tmp_path / "run"
    code = epban_main(["train-metric", "--data", str(toy), "--out", str(out), "--epochs", "1", "--quiet",
                       "--init", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "init=" in err[0], err
    assert not out.exists()


def test_init_random_and_bundled_differ(toy, tmp_path):
    """``init="auto"`` starts the tiny model from the bundled weights, ``"random"`` does not."""
    runs = {}
    for init in ("auto", "random"):
        best = train_metric(toy, epochs=1, max_steps=1, out=tmp_path / init, init=init, **FAST)
        runs[init] = json.loads((best / "training.json").read_text())["init"]
    assert runs["random"] == "random" and runs["auto"].endswith("tiny-ssim")


def test_crops_per_image_and_cosine_warmup(toy, tmp_path):
    """crops_per_image=2 doubles the steps of an epoch; warmup rises linearly, cosine ends near 0."""
    rows = []
    best = train_metric(toy, epochs=2, out=tmp_path / "run", callback=rows.append, crops_per_image=2,
                        lr_schedule="cosine", warmup_steps=3, **FAST)
    per_epoch = 2 * 16 // FAST["batch_size"]
    assert [(r["epoch"], r["step"]) for r in rows] == [(s // per_epoch, s + 1) for s in range(2 * per_epoch)]
    lrs = [r["lr"] for r in rows]  # the rate after each step, for the next one
    lr, total = FAST["lr"], 2 * per_epoch
    assert lrs[0] == pytest.approx(lr * 2 / 3 * 0.5 * (1 + math.cos(math.pi / total)))
    assert lrs[2] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 3 / total)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    info = json.loads((best / "training.json").read_text())
    assert info["crops_per_image"] == 2 and info["lr_schedule"] == "cosine" and info["warmup_steps"] == 3
    with pytest.raises(ValueError, match="crops_per_image"):
        train_metric(toy, epochs=1, out=tmp_path / "bad", crops_per_image=0, **FAST)


def test_cli_eval_metric_bundled_weights_by_name(toy, capsys):
    assert epban_main(["eval-metric", "--data", str(toy), "--split", "val", "--weights", "tiny-ssim", "--quiet",
                       "--workers", "0", "--threads", "1"]) == 0
    assert "SRCC" in capsys.readouterr().out


# ------------------------------------------------------- start-up checks, resume, divergence
def _status(argv) -> int:
    """``main``'s status: returned (our errors) or raised by argparse (its own)."""
    try:
        return epban_main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("command, flags, option", [
    ("train-metric", ["--crop", "-5"], "--crop"), ("train-metric", ["--crop", "0"], "--crop"),
    ("train-metric", ["--crop", "8"], "--crop"), ("train-metric", ["--lr", "inf"], "--lr"),
    ("train-metric", ["--lr", "0"], "--lr"), ("train-metric", ["--batch-size", "0"], "--batch-size"),
    ("train-metric", ["--workers", "-1"], "--workers"), ("train-metric", ["--eval-size", "16"], "--eval-size"),
    ("eval-metric", ["--eval-size", "-4"], "--eval-size"), ("eval-metric", ["--eval-size", "16"], "--eval-size"),
    ("eval-metric", ["--batch-size", "0"], "--batch-size"), ("eval-metric", ["--workers", "-1"], "--workers"),
])
def test_cli_bad_numbers_refused_at_start(toy, tmp_path, capsys, command, flags, option):
    out = tmp_path / "out"
    extra = ["--weights", "tiny-ssim", "--split", "val"] if command == "eval-metric" else ["--epochs", "1"]
    assert _status([command, "--data", str(toy), "--out", str(out), "--quiet", "--threads", "1"] + extra + flags) == 2
    line = _one_line(capsys)
    assert f"argument {option}:" in line and "Traceback" not in line, line
    assert not out.exists()


def _copy_run(run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run[0], out)
    return out


def _with_scores(manifest, change) -> list[str]:
    """The lines of ``manifest`` with each row's score replaced by ``change(score, split)``."""
    lines = []
    for line in manifest.read_text().splitlines():
        fields = line.split(",")
        if not line.startswith(("#", "sr_path")):
            fields[2] = change(fields[2], fields[-1])
        lines.append(",".join(fields))
    return lines


def _resume(toy, out, *flags):
    return _status(["train-metric", "--data", str(toy), "--out", str(out), "--resume", "--crop", "32",
                    "--batch-size", "4", "--lr", "1e-3", "--epochs", "2", "--max-steps", "6", "--workers", "0",
                    "--quiet", "--threads", "1", *flags])


def test_cli_resume_damaged_or_missing_state_one_line(run, toy, tmp_path, capsys):
    out = _copy_run(run, tmp_path)
    state = out / "last" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    log = (out / "log.csv").read_text()
    assert _resume(toy, out) == 2
    line = _one_line(capsys)
    assert str(state) in line and "not a readable checkpoint" in line, line
    state.unlink()
    assert _resume(toy, out) == 2
    line = _one_line(capsys)
    assert str(state) in line and "Errno" not in line, line
    torch.save({"step": 3}, state)  # a dict, not ours
    assert _resume(toy, out) == 2
    line = _one_line(capsys)
    assert f"{state}: not a training state of ours (it lacks optimizer" in line, line
    assert (out / "log.csv").read_text() == log


def test_cli_resume_with_changed_options_is_refused(run, toy, tmp_path, capsys):
    out = _copy_run(run, tmp_path)
    info = (out / "last" / "training.json").read_text()
    assert _resume(toy, out, "--lr", "1", "--config", "resnet34") == 2
    line = _one_line(capsys)
    assert "--lr: 1.0 (the run's: 0.001)" in line and "--config: resnet34 (the run's: tiny)" in line, line
    other = toy.parent / "other.csv"  # the same pairs, other scores
    other.write_text("\n".join(_with_scores(toy, lambda score, split: str(float(score) + 1))) + "\n")
    try:
        assert _resume(toy, out, "--data", str(other)) == 2
    finally:
        other.unlink()
    line = _one_line(capsys)
    assert f"--data: {other} (the run's: {toy})" in line and "the training scores of --data" in line, line
    assert _resume(toy, out, "--overwrite") == 2
    assert "--overwrite" in _one_line(capsys)
    assert (out / "last" / "training.json").read_text() == info


def test_resume_records_the_options_it_used(toy, tmp_path, monkeypatch):
    """A path spelled otherwise is the same option; what is recorded is the run's."""
    out = tmp_path / "run"
    train_metric(toy, epochs=2, max_steps=1, out=out, **FAST)
    monkeypatch.chdir(toy.parent)
    rows = []
    train_metric(toy.name, epochs=2, max_steps=2, out=out, resume=True, callback=rows.append, **FAST)
    info = json.loads((out / "last" / "training.json").read_text())
    assert [r["step"] for r in rows] == [2] and info["step"] == 2
    assert info["data"] == str(toy) and info["lr"] == FAST["lr"]
    with pytest.raises(ValueError, match="--lr: 0.5"):
        train_metric(toy, epochs=2, max_steps=3, out=out, resume=True, **dict(FAST, lr=0.5))


def _nan_after(calls: int):
    """A stand-in for ``torch.nn.functional`` whose ``mse_loss`` turns NaN after ``calls`` calls."""
    import types

    import torch.nn.functional as F

    count = [0]

    def mse_loss(pred, target):
        count[0] += 1
        loss = F.mse_loss(pred, target)
        return loss * math.nan if count[0] > calls else loss

    return types.SimpleNamespace(mse_loss=mse_loss)


def test_divergence_is_named_and_keeps_the_last_good_checkpoint(toy, tmp_path, monkeypatch):
    from epban.metric import trainer

    out = tmp_path / "run"
    with pytest.raises(trainer.TrainingDiverged, match="epoch 1, step 2: the training loss is not finite; "
                                                       "start again with a lower --lr than 1e\\+06"):
        train_metric(toy, epochs=1, out=out, **dict(FAST, lr=1e6))
    assert _log(out / "log.csv") == [] and not (out / "last").exists()
    # nothing was saved: the same --out starts again without --overwrite
    train_metric(toy, epochs=1, max_steps=1, out=out, **FAST)
    # a NaN loss in epoch 2 (step 5): epoch 1's checkpoint stays
    monkeypatch.setattr(trainer, "F", _nan_after(4))
    with pytest.raises(trainer.TrainingDiverged, match=f"epoch 2, step 5: .*{out / 'last'}, is kept"):
        train_metric(toy, epochs=2, out=out, overwrite=True, **FAST)
    assert json.loads((out / "last" / "training.json").read_text())["step"] == 4
    assert len(_log(out / "log.csv")) == 1


def test_cli_divergence_in_validation_names_no_row(toy, tmp_path, capsys, monkeypatch):
    from epban.metric import trainer

    real = trainer.predict
    monkeypatch.setattr(trainer, "predict", lambda *a, **k: real(*a, **k) * math.nan)
    out = tmp_path / "run"
    assert _status(["train-metric", "--data", str(toy), "--out", str(out), "--crop", "32", "--batch-size", "4",
                    "--epochs", "1", "--max-steps", "1", "--workers", "0", "--quiet", "--threads", "1"]) == 2
    line = _one_line(capsys)
    assert "training diverged in epoch 1, step 1: the model's scores on the validation images are not finite" \
        in line and ".csv:" not in line, line


def test_constant_val_scores_say_n_a_and_keep_the_last_epoch(toy, tmp_path, capsys):
    data = tmp_path / "flat.csv"
    data.write_text("\n".join(_with_scores(toy, lambda score, split: "50" if split == "val" else score)) + "\n")
    for name in ("SR", "HR"):
        (tmp_path / name).symlink_to(toy.parent / name)
    out = tmp_path / "run"
    assert _status(["train-metric", "--data", str(data), "--out", str(out), "--crop", "32", "--batch-size", "4",
                    "--epochs", "2", "--max-steps", "5", "--workers", "0", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "val SRCC n/a" in err and "nan" not in err.lower().replace("synthetic", "") and "-inf" not in err, err
    assert "no epoch had a defined val SRCC" in err and "best is the last validated epoch" in err
    assert json.loads((out / "best" / "training.json").read_text())["step"] == 5


def test_cli_crop_larger_than_images_warns_once(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert _status(["train-metric", "--data", str(toy), "--out", str(out), "--crop", "96", "--batch-size", "4",
                    "--epochs", "1", "--max-steps", "1", "--workers", "0", "--quiet", "--threads", "1"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: 16 of 16 training images are smaller than --crop 96 (the smallest is 64x64): "
                   "their crops are upsampled to 96x96"], err


def test_cli_eval_out_checked_before_scoring(run, toy, tmp_path, capsys, monkeypatch):
    from epban.metric import evaluate

    monkeypatch.setattr(evaluate, "predict", lambda *a, **k: pytest.fail("scored before checking --out"))
    a_file = tmp_path / "rgb.png"
    a_file.write_bytes(b"x")
    for out, message in [(a_file, f"--out {a_file} is a file"),
                         (a_file / "sub", f"--out {a_file / 'sub'}: cannot create this folder")]:
        assert epban_main(["eval-metric", "--data", str(toy), "--split", "val", "--weights", str(run[1]),
                           "--out", str(out), "--workers", "0", "--quiet"]) == 2
        line = _one_line(capsys)
        assert message in line and "Errno" not in line, line


@pytest.mark.parametrize("command", ["eval-metric", "train-metric"])
def test_cli_unreadable_weights_named(toy, tmp_path, capsys, command):
    weights = tmp_path / "random.png"
    weights.write_bytes(os.urandom(3000))
    out = tmp_path / "out"
    extra = ["--split", "val"] if command == "eval-metric" else ["--config", "resnet34", "--init", "random",
                                                                  "--epochs", "1"]
    assert epban_main([command, "--data", str(toy), "--weights", str(weights), "--out", str(out), "--workers", "0",
                       "--quiet", "--threads", "1"] + extra) == 2
    line = _one_line(capsys)
    assert str(weights) in line, line
    assert not out.exists()
