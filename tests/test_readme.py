"""The README's API example runs as written (a tiny metric stands in for a trained one)."""
import re
from pathlib import Path

import torch

import epban

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_use_example_runs(tmp_path, monkeypatch):
    code = re.search(r"## Use\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    epban.EfficientPBAN(epban.PBANConfig.tiny()).save_pretrained(tmp_path / "runs" / "metric" / "best")
    torch.save(epban.EfficientPBAN(epban.PBANConfig.official()).state_dict(), tmp_path / "pban.pth")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["scores"].shape == (4,)
    assert set(namespace["parts"]) == {"l1", "ssim", "pban"}
