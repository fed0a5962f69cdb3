"""Manifests (both formats), their errors, paired transforms, samplers, and the toy set."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from epban.data import (DataPolicy, EpochBatchSampler, ManifestError, PairDataset, PairedEvalTransform,
                        PairedTrainTransform, SizeGroupedBatchSampler, check_images, load_manifest,
                        make_toy_dataset, read_csv_manifest, read_list_file, select_split)
from epban.imageio import write_image


def _img(path: Path, h=40, w=48, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)))
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- CSV
def test_csv_manifest(tmp_path):
    _img(tmp_path / "sr" / "a.png"), _img(tmp_path / "hr" / "a.png")
    m = _write(tmp_path / "m.csv", "# a comment\nsr_path,hr_path,score,method,split\n"
                                   "sr/a.png,hr/a.png,3.5,bicubic,train\nsr/a.png,hr/a.png,-1e1,,TEST\n")
    s = read_csv_manifest(m)
    assert [x.score for x in s] == [3.5, -10.0]
    assert s[0].sr_path == tmp_path / "sr" / "a.png" and s[0].hr_path == tmp_path / "hr" / "a.png"
    assert (s[0].method, s[0].split, s[1].method, s[1].split) == ("bicubic", "train", None, "test")
    assert s[0].where == f"{m}:3"
    assert load_manifest(m) == s
    assert check_images(s) == [(40, 48), (40, 48)]
    assert select_split(s, "test", m) == [s[1]]


@pytest.mark.parametrize("text, message", [
    ("sr_path,hr_path,score,mos\n", "m.csv:1: unknown column(s) 'mos'"),
    ("sr_path,score\n", "missing column(s) 'hr_path'"),
    ("sr_path,hr_path,score\n# c\na.png,b.png,nan\n", "m.csv:3: score 'nan' is not a finite number"),
    ("sr_path,hr_path,score\na.png,b.png,good\n", "m.csv:2: score 'good' is not a number"),
    ("sr_path,hr_path,score,split\na.png,b.png,1,training\n", "m.csv:2: split 'training'"),
    ("sr_path,hr_path,score\na.png,b.png\n", "m.csv:2: 2 fields, the header has 3"),
    ("# only comments\n", "empty manifest"),
])
def test_csv_errors_name_the_line(tmp_path, text, message):
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_csv_manifest(_write(tmp_path / "m.csv", text))


def test_empty_split(tmp_path):
    m = _write(tmp_path / "m.csv", "sr_path,hr_path,score,split\na.png,b.png,1,train\n")
    with pytest.raises(ManifestError, match="the val split is empty.*splits present: train"):
        select_split(read_csv_manifest(m), "val", m)


def test_empty_manifest_says_so(tmp_path):
    """A header without samples is an empty manifest, whatever its columns."""
    m = _write(tmp_path / "m.csv", "sr_path,hr_path,score,method,split\n")
    for split in ("train", None):
        with pytest.raises(ManifestError, match="m.csv: the manifest is empty") as exc:
            select_split(read_csv_manifest(m), split, m)
        assert "split column" not in str(exc.value)
    m = _write(tmp_path / "n.csv", "sr_path,hr_path,score,split\na.png,b.png,1,\n")
    with pytest.raises(ManifestError, match="the train split is empty .no sample names a split"):
        select_split(read_csv_manifest(m), "train", m)


def test_check_images_finds_a_truncated_file(tmp_path):
    """The header alone is whole: only a check of the file's structure finds it before training."""
    _img(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    m = _write(tmp_path / "m.csv", "sr_path,hr_path,score\na.png,a.png,1\na.png,cut.png,2\n")
    with pytest.raises(ManifestError, match=r"m.csv:3: HR image .*cut.png cannot be read"):
        check_images(read_csv_manifest(m))


def test_image_problems_name_the_line(tmp_path):
    _img(tmp_path / "a.png"), _img(tmp_path / "small.png", 20, 20)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    m = _write(tmp_path / "m.csv", "sr_path,hr_path,score\na.png,a.png,1\nmissing.png,a.png,2\n"
                                   "broken.png,a.png,3\nsmall.png,a.png,4\n")
    samples = read_csv_manifest(m)
    assert check_images(samples[:1]) == [(40, 48)]
    with pytest.raises(ManifestError, match=r"m.csv:3: SR image .*missing.png does not exist"):
        check_images(samples[1:2])
    with pytest.raises(ManifestError, match=r"m.csv:4: SR image .*broken.png cannot be read"):
        check_images(samples[2:3])
    with pytest.raises(ManifestError, match=r"m.csv:5: SR image .*small.png is 20x20 but its HR .* is 48x40"):
        check_images(samples[3:4])
    with pytest.raises(ManifestError, match="m.csv:3: .*missing.png: no such file"):
        PairDataset(samples, PairedEvalTransform())[1]


# ----------------------------------------------------------------------------- authors' list files
def test_list_files(tmp_path):
    for name in ("x_sr.png", "y_sr.png"):
        _img(tmp_path / "SR_results" / "sub" / name)
    _img(tmp_path / "HR" / "x.png")
    _write(tmp_path / "train.txt", "sub/x_sr.png#3.25#0#x.png\n\nsub/y_sr.png#1#unused#x.png\n")
    _write(tmp_path / "test.txt", "sub/y_sr.png#4.5#0#x.png\n")
    train = read_list_file(tmp_path / "train.txt")
    assert [(s.score, s.split) for s in train] == [(3.25, "train"), (1.0, "train")]
    assert train[0].sr_path == tmp_path / "SR_results" / "sub" / "x_sr.png"
    assert train[0].hr_path == tmp_path / "HR" / "x.png"
    assert train[1].where.endswith("train.txt:3")
    both = load_manifest(tmp_path)  # a folder with the list files
    assert [s.split for s in both] == ["train", "train", "test"]
    check_images(both)
    other = tmp_path / "elsewhere"
    other.mkdir()
    moved = read_list_file(_write(other / "mine.txt", "a.png#1#0#b.png\n"), root=tmp_path, split="val")
    assert moved[0].sr_path == tmp_path / "SR_results" / "a.png" and moved[0].split == "val"


@pytest.mark.parametrize("line, message", [("a.png#1#b.png", "3 field"), ("a.png#x#0#b.png", "score 'x'"),
                                           ("a.png#inf#0#b.png", "not a finite"), ("#1#0#b.png", "empty SR")])
def test_list_file_errors(tmp_path, line, message):
    with pytest.raises(ManifestError, match=f"val.txt:2: .*{message}"):
        read_list_file(_write(tmp_path / "val.txt", "a.png#1#0#b.png\n" + line + "\n"))


def test_unknown_manifest_kind(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path / "nope.json")
    with pytest.raises(ManifestError, match="train.txt"):
        load_manifest(tmp_path)


# ----------------------------------------------------------------------------- transforms
def _coords(h, w):
    """An image whose pixels say where they are: channel 0 = row / h, channel 1 = column / w."""
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w) / h
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w) / w
    return torch.stack([rows, cols, torch.zeros(h, w)])


@pytest.mark.parametrize("seed", range(6))
def test_train_crop_keeps_pairs_aligned(seed):
    h, w = 50, 70
    hr = _coords(h, w)
    sr = 0.5 * hr + 0.25  # a different image with the same geometry (resizing is linear)
    t = PairedTrainTransform(crop_sizes=(24, 32), out_size=24, hflip=True)
    box, flip = t.draw(h, w, np.random.default_rng(seed))
    out_sr, out_hr = t(sr, hr, np.random.default_rng(seed))
    assert out_sr.shape == out_hr.shape == (3, 24, 24)
    torch.testing.assert_close(out_sr, 0.5 * out_hr + 0.25)  # same box, same flip
    if box.size == 24:  # no resize: the crop is exactly the drawn box
        expected = box.apply(hr)
        torch.testing.assert_close(out_hr, expected.flip(-1) if flip else expected)


def test_flip_and_crop_are_random_and_reproducible():
    t = PairedTrainTransform(crop_sizes=(16,), out_size=16, hflip=True)
    draws = [t.draw(64, 64, np.random.default_rng(s)) for s in range(40)]
    assert len({d[0] for d in draws}) > 20 and {d[1] for d in draws} == {True, False}
    assert t.draw(64, 64, np.random.default_rng(3)) == draws[3]
    box, _ = t.draw(10, 12, np.random.default_rng(0))  # larger than the image: clipped to it
    assert box.size == 10


def test_eval_transform_and_policies():
    x = torch.rand(3, 40, 60)
    assert PairedEvalTransform(None)(x, x)[0] is x
    assert PairedEvalTransform(32)(x, x)[0].shape == (3, 32, 32)
    assert DataPolicy.authors().eval_size == 512 and DataPolicy.authors().crop_sizes == (768, 900, 1080)
    assert DataPolicy.for_config("tiny") == DataPolicy.crop(96)
    p = DataPolicy.crop(64, eval_size=48)
    assert DataPolicy.from_dict(p.to_dict()) == p


# ----------------------------------------------------------------------------- samplers
def test_epoch_sampler_is_reproducible_and_resumable():
    s = EpochBatchSampler(23, 4, seed=7)
    s.set_epoch(2)
    full = list(s)
    assert len(full) == 5 and all(len(b) == 4 for b in full)  # drop_last
    assert len({i for b in full for i, _ in b}) == 20
    s.set_epoch(2, start_batch=3)
    assert list(s) == full[3:]
    s.set_epoch(3)
    assert list(s) != full
    # two ranks split each global batch of the one-process order with batch 2 * 4
    one = EpochBatchSampler(23, 8, seed=7)
    one.set_epoch(1)
    ranks = [EpochBatchSampler(23, 4, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(1)
    for b, b0, b1 in zip(one, *ranks):
        assert b == b0 + b1


def test_size_grouped_batches():
    sizes = [(32, 32), (40, 32), (32, 32), (32, 32), (40, 32)]
    batches = list(SizeGroupedBatchSampler(sizes, 2))
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert all(len({sizes[i] for i in b}) == 1 for b in batches)
    shards = [list(SizeGroupedBatchSampler(sizes, 2, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(i for sh in shards for b in sh for i in b) == list(range(5))


# ----------------------------------------------------------------------------- toy set
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", size=64, quiet=True)


def test_toy_dataset(toy, capsys):
    text = toy.read_text()
    assert text.startswith("# SYNTHETIC")
    assert "SYNTHETIC" in (toy.parent / "README.md").read_text()
    samples = load_manifest(toy)
    assert len(samples) >= 8 * 10
    assert check_images(samples[:5]) == [(64, 64)] * 5
    by_split = {}
    for s in samples:
        by_split.setdefault(s.split, set()).add(s.hr_path)
        assert 0 < s.score <= 100 and s.method
    assert set(by_split) == {"train", "val", "test"}
    assert all(len(v) >= 2 for v in by_split.values())
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])  # no photo in two splits
    methods = {s.method for s in samples}
    assert {"nearest_x4", "bicubic_x2", "blur", "noise", "jpeg", "ringing", "oversharpen"} <= methods
    # scores follow the documented formula: x4 is worse than x2 for every kernel
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    score = {(r["hr_path"], r["method"]): float(r["score"]) for r in rows}
    for hr in by_split["train"]:
        rel = hr.relative_to(toy.parent).as_posix()
        assert score[(rel, "bicubic_x4")] < score[(rel, "bicubic_x2")]
    # the graded levels of each single degradation come in order of strength: scores strictly decrease
    for hr in {r["hr_path"] for r in rows}:
        for method in ("blur", "ringing", "noise", "jpeg", "oversharpen"):
            levels = [float(r["score"]) for r in rows if r["hr_path"] == hr and r["method"] == method]
            assert len(levels) >= 5 and all(a > b for a, b in zip(levels, levels[1:])), (hr, method, levels)


def test_toy_dataset_is_reproducible_and_guarded(toy, tmp_path, capsys):
    again = make_toy_dataset(toy.parent, size=64)  # replaces the earlier toy set in place
    assert "SYNTHETIC" in capsys.readouterr().err
    assert again.read_text() == toy.read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an epban toy set"):
        make_toy_dataset(tmp_path / "mine", size=64, quiet=True)
    assert not list(tmp_path.glob(".mine.tmp-*"))


def _user_files(folder: Path) -> dict:
    """Files a user adds to a toy set's folder (notes, a subset, a run)."""
    files = {"my_notes.txt": "notes", "my_subset.csv": "sr_path,hr_path,score\n", "runs/keep.txt": "keep"}
    for name, text in files.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    return files


def test_toy_dataset_replaces_only_its_own_entries(tmp_path, capsys):
    """Remaking a toy set (here through the command) replaces its own files and folders and keeps the user's."""
    from epban.cli import main

    out = tmp_path / "toy"
    make_toy_dataset(out, size=32, quiet=True)
    files = _user_files(out)
    assert main(["make-dataset", "--toy", str(out), "--size", "32", "--seed", "1", "--quiet", "--threads", "1"]) == 0
    assert {name: (out / name).read_text() for name in files} == files
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["HR", "SR", "README.md", "degradations.json", "manifest.csv", ".epban-toy-dataset", "my_notes.txt",
         "my_subset.csv", "runs"])  # no temporary folder left
    assert '"seed": 1' in (out / "degradations.json").read_text()
    assert len(load_manifest(out / "manifest.csv")) > 8 * 10
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]


def test_toy_dataset_interrupted_replacement_keeps_the_old_set(tmp_path, monkeypatch):
    """A failure while the new set is moved in puts the old one back whole, user files included."""
    import epban.data.toy as toy

    out = tmp_path / "toy"
    make_toy_dataset(out, size=32, quiet=True)
    files = _user_files(out)
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    names = sorted(p.name for p in out.iterdir())
    replace, calls = toy.os.replace, []

    def fail_on_the_fourth(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # the new marker is in, the old HR aside: moving the new HR in fails
            raise OSError("disk gone")
        replace(src, dst)

    monkeypatch.setattr(toy.os, "replace", fail_on_the_fourth)
    with pytest.raises(OSError, match="disk gone"):
        make_toy_dataset(out, size=32, seed=1, quiet=True)
    monkeypatch.undo()
    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert sorted(p.name for p in out.iterdir()) == names  # no temporary folder left
    assert after == before and {name: (out / name).read_text() for name in files} == files
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]
