"""Distilled students cached by the hash of everything they depend on: a compile that changes only its targets
skips training. Weights in safetensors, the rest in JSON, swapped in atomically."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from edgedistill.distill.loop import DistillResult
from edgedistill.distill.checkpoint import unshared


def save_stage(directory: Path, trained: DistillResult) -> None:
    """Store a distilled student (weights in safetensors, the rest in JSON) under its input hash, atomically."""
    from safetensors.torch import save_file

    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(unshared(trained.student.state_dict()), str(tmp / "student.safetensors"))
    (tmp / "result.json").write_text(json.dumps({"best_fidelity": trained.best_fidelity, "best_step": trained.best_step,
                                                 "history": trained.history}), encoding="utf-8")
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(directory, ignore_errors=True)
    try:
        os.replace(tmp, directory)
    except OSError:  # another compile stored the same student first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


def load_stage(directory: Path, student: torch.nn.Module) -> DistillResult | None:
    """Return the cached distilled student (loaded into `student`), or None if the cache has none (or a bad one)."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((directory / "result.json").read_text(encoding="utf-8"))
        student.load_state_dict(load_file(str(directory / "student.safetensors")))
    except Exception:  # noqa: BLE001  missing, truncated or foreign entry (safetensors raises its own type): retrain
        return None
    student.eval()
    return DistillResult(student, meta["best_fidelity"], meta["best_step"], [tuple(h) for h in meta["history"]])
