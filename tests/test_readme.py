"""The README's examples run as written (a tiny metric stands in for a trained one), and its
commands name what exists."""
import re
import shlex
from pathlib import Path

import torch

import epban
from epban.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def _quick_start() -> str:
    match = re.search(r"## Quick start\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md has no '## Quick start' section opening with a python block"
    return match.group(1)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Every python block, in order, in one namespace: the quick start first, then the API's."""
    blocks = _blocks("python")
    assert blocks and blocks[0] == _quick_start()
    torch.manual_seed(0)
    epban.EfficientPBAN(epban.PBANConfig.tiny()).save_pretrained(tmp_path / "runs" / "metric" / "best")
    torch.save(epban.EfficientPBAN(epban.PBANConfig.official()).state_dict(), tmp_path / "pban.pth")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], f"{README}:quick start", "exec"), namespace)

    # The quick start's results are what its comments say they are.
    sr, hr = namespace["sr"], namespace["hr"]
    assert namespace["scores"].shape == (4,)
    assert set(namespace["parts"]) == {"l1", "ssim_loss", "pban_loss"}
    assert namespace["s"].shape == () and 0 < float(namespace["s"].detach()) < 1
    torch.testing.assert_close(namespace["ssim_term"], 0.2 * (1 - namespace["s"]))
    assert sr.grad is not None and torch.isfinite(sr.grad).all() and sr.grad.abs().sum() > 0
    assert all(p.grad is None for p in namespace["metric"].parameters())

    for i, code in enumerate(blocks[1:], 1):
        exec(compile(code, f"{README}:python block {i}", "exec"), namespace)
    assert namespace["per_image"].shape == (4,)
    assert namespace["ssim_map"].shape == sr.shape
    assert namespace["out"].shape == namespace["q"].shape
    assert namespace["authors"].config.name == "official"
    assert namespace["same"].config.sigma_scope == "batch"
    assert namespace["pban_term"].shape == () and torch.isfinite(namespace["pban_term"])
    # the torchmetrics block: the mean over the images updated, as the metric scores them
    torch.testing.assert_close(namespace["mean_pban"], namespace["scores"].detach().mean())
    torch.testing.assert_close(namespace["val_ssim"].compute(), namespace["s"].detach())


def test_readme_opens_with_make_demo_and_make_test():
    first = _blocks("bash")[0].splitlines()
    assert [line.split("#")[0].strip() for line in first[:2]] == ["make demo", "make test"]


def test_readme_commands_exist():
    """Every `epban <command>` in the README's shell blocks is a command of the CLI, and every
    --option it gives that command is one of the command's options."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    scripts = {"scripts/train_sr.py": "train-sr"}
    seen = set()
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0]
            words = shlex.split(line.replace("...", "").replace("[", " ").replace("]", " "))
            for i, word in enumerate(words):
                if word == "epban" and i + 1 < len(words):
                    command = words[i + 1]
                elif word in scripts:
                    command = scripts[word]
                else:
                    continue
                assert command in commands, f"README names `epban {command}`, which the CLI does not have"
                options = commands[command]._option_string_actions
                for option in words[i + 2:]:
                    if option.startswith("--"):
                        assert option in options, f"README gives `epban {command}` an unknown option {option}"
                seen.add(command)
    assert {"score", "info", "make-dataset", "train-metric", "eval-metric", "train-sr"} <= seen


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
