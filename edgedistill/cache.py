"""Teacher-output cache: one memory-mapped .npy per (teacher, data, max length, head), computed once."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np


def default_cache_dir() -> Path:
    """Return $EDGEDISTILL_CACHE, else $XDG_CACHE_HOME/edgedistill, else ~/.cache/edgedistill."""
    if os.environ.get("EDGEDISTILL_CACHE"):
        return Path(os.environ["EDGEDISTILL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgedistill"


def cache_key(*parts: object) -> str:
    """Return a content key over the parts (teacher sha256, data sha256, max length, head...)."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:40]


def cached_outputs(cache_dir: Path, key: str, compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
    """Return (outputs, hit): the memory-mapped array stored under `key`, computing and storing it on a miss.

    The file is written under a temporary name and renamed, so a killed run never leaves a partial entry.
    """
    path = cache_dir / "teacher-outputs" / f"{key}.npy"
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r"), True
        except (ValueError, OSError):
            path.unlink(missing_ok=True)  # unreadable entry: recompute
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs = np.ascontiguousarray(compute(), dtype=np.float32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.save(f, outputs)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r"), False
