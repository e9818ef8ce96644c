"""Atomic artifact writing: a crash mid-write never leaves a truncated file that looks finished."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd

from core.files import atomic_path


def write_text(target: Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    """Replace NaN/inf by None so the JSON is strict (other tools reject NaN)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(target: Path, data: Any) -> Path:
    text = json.dumps(_finite(json.loads(json.dumps(data, default=_json_default))), indent=2, allow_nan=False)
    return write_text(target, text + "\n")


def write_csv(target: Path, frame: pd.DataFrame, **kwargs: Any) -> Path:
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, **kwargs)
    return Path(target)


def write_npz(target: Path, **arrays: np.ndarray) -> Path:
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return Path(target)


def write_joblib(target: Path, obj: Any) -> Path:
    with atomic_path(target) as tmp:
        joblib.dump(obj, tmp)
    return Path(target)


def write_with(target: Path, writer: Callable[[Path], None]) -> Path:
    """Atomic write through any function that writes to a path (torch.save, fig.savefig, ...)."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
