"""Backends: one per runtime a target can name. Each turns the distilled torch student into the files a device runs
and a callable that runs them here, so that validation and timing measure what ships. Looked up by profile.runtime."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgedistill.families.text_encoder import EncoderWithHead, TextEncoderFamily

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass
class BuildContext:
    """What a backend needs besides the profile: the student, its inputs, calibration text, a fidelity probe."""

    student: EncoderWithHead
    family: TextEncoderFamily
    tokenizer: object
    input_names: list[str]
    max_length: int
    calibration_texts: list[str]
    fidelity: Callable[[Runner, tuple[int, int] | None], float]  # on the quantization-search texts
    floor: float  # the budget that fidelity must reach


@dataclass
class Built:
    """A built model: files to ship, a runner of what the device runs, its fixed (batch, sequence) if any, and the
    manifest sections the backend owns (export, optimization, quantization, model)."""

    files: dict[str, Path]
    run: Runner
    fixed_shape: tuple[int, int] | None
    model_file: str
    record: dict = field(default_factory=dict)
    not_measured: str | None = None  # why latency cannot be measured here (the target's device is absent)


_BACKENDS: dict[str, Callable] = {}


def unmeasured_latency(profile, reason: str, shape: dict) -> dict:
    """Return the latency section of a target whose device is not here: the shape it would run (`shape`, e.g.
    batch and sequence), and why there is no number."""
    return {**shape, "threads_profile": profile.threads, "threads_measured": 0, "not_measured": reason,
            "note": f"not measured: {reason}. Run `edgedistill bench` on a machine with the device."}


def trial_latency(run: Runner, feeds: dict[str, np.ndarray], runs: int = 10) -> float:
    """Return the median ms of `runs` calls after 2 warm-up calls: a quick figure to compare quantization trials
    (the artifact itself is timed properly, against the teacher, after validation)."""
    import time

    for _ in range(2):
        run(feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def register_backend(runtime: str):
    def wrap(fn):
        _BACKENDS[runtime] = fn
        return fn

    return wrap


def build_model(profile, ctx: BuildContext, stage_dir: Path) -> Built:
    """Return the model for `profile`, built by the backend of its runtime."""
    return _BACKENDS[profile.runtime](profile, ctx, stage_dir)


from edgedistill.backends import executorch, onnxruntime  # noqa: E402,F401  (registers the backends)
