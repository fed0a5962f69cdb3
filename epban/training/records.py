"""JSON records of a run (configuration, metrics, reports): strict JSON, written atomically."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def json_safe(obj):
    """``obj`` with every non-finite float (NaN, infinity) replaced by ``None``: strict JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path, obj) -> Path:
    """Write ``obj`` to ``path`` as indented JSON (non-finite floats as ``null``); a reader never
    sees a half-written file. Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path
