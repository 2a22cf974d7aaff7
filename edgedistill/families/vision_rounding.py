"""The student a vision target exports, its int8 weights rounded by GPTQ with corrected biases
(quantize/conv_rounding.py) when the profile's `vision.weight_rounding` says so, cached by student and views."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from edgedistill import __version__
from edgedistill.cache import array_digests, cache_key, default_cache_dir
from edgedistill.distill.qat_conv import fold_batchnorm
from edgedistill.families.vision import is_program
from edgedistill.families.vision_stages import VisionDistilled, _example, calibration_views
from edgedistill.images import to_pixels
from edgedistill.progress import new_progress
from edgedistill.quantize.configs import int8_weight_levels
from edgedistill.quantize.conv_rounding import DAMP, round_weights
from edgedistill.targets import TargetProfile

ROUNDING_VIEWS = 128  # training views GPTQ's H and the bias corrections are measured on (README: calibrated rounding)


def rounded_student(d: VisionDistilled, profile: TargetProfile, opts) -> tuple[torch.nn.Module, dict]:
    """Return what `profile` exports and a record of how its weights were rounded: for a static int8 recipe with
    per-channel weights (and uint8 activations, for onnxruntime) and `weight_rounding: gptq`, a copy of the student
    with BatchNorm folded, its weights on their int8 grid by GPTQ and its biases corrected (quantize/conv_rounding.py),
    computed once per student and calibration views (cached in `cache_dir`) and shared by the targets; otherwise the
    student, for the quantizer to round to nearest. A quantization-aware student trained through nearest rounding
    keeps it (measured on MobileNetV2: GPTQ on it 0.829 top-1 agreement vs 0.880), and so does a search's rung (a
    student trained to a share of its steps; the finished ones, and the untrained teacher's shape, are rounded)."""
    from edgedistill.quantize.configs import StaticQdqInt8Config, XnnpackStaticInt8Config

    student, vision = d.trained.student.eval(), profile.vision
    cfg = vision.quantization
    nearest = {"method": "nearest (the quantizer's)"}
    static = (isinstance(cfg, XnnpackStaticInt8Config)
              or (isinstance(cfg, StaticQdqInt8Config) and cfg.activation_type == "uint8"))
    if vision.weight_rounding != "gptq" or not static:
        return student, nearest
    if d.quantization_aware:
        return student, {**nearest, "why": "the student was distilled through nearest rounding"}
    if not d.trained.complete:
        return student, {**nearest, "why": "a search rung (the finished students are rounded by GPTQ)"}
    if not cfg.per_channel:
        return student, {**nearest, "why": "gptq rounds onto per-channel grids; this recipe's weights are per tensor"}
    if is_program(student):
        return student, {**nearest, "why": "a torch.export program has no modules to round"}
    n, levels = cfg.calibration_texts, int8_weight_levels(cfg)
    if (n, levels) in d.rounded:
        return d.rounded[(n, levels)]
    model = copy.deepcopy(student)
    try:
        fold_batchnorm(model, _example(d.size))
    except RuntimeError as e:  # a convolution output with another consumer beside its BatchNorm
        d.rounded[(n, levels)] = (student, {**nearest, "why": f"BatchNorm could not be folded ({e})"})
        return d.rounded[(n, levels)]
    calibration = calibration_views(d.train_views, n)
    views = calibration_views(d.train_views, ROUNDING_VIEWS)
    key = cache_key("vision-rounding-v1", hashlib.sha256(b"".join(
        t.detach().cpu().numpy().tobytes() for t in student.state_dict().values())).hexdigest(),
        array_digests(calibration).tobytes().hex(), array_digests(views).tobytes().hex(), DAMP, torch.__version__,
        __version__, *([("weight-levels", levels)] if levels != 127 else []))
    directory = (opts.cache_dir or default_cache_dir()) / "rounded" / key
    record = _load_rounded(directory, model)
    if record is None:
        with new_progress() as progress:
            task = progress.add_task("rounding int8 weights by GPTQ", total=None, status="")
            record = round_weights(model, _example(d.size), to_pixels(calibration), to_pixels(views),
                                   lambda done, total: progress.update(task, completed=done, total=total), levels)
        _save_rounded(directory, model, record)
    d.rounded[(n, levels)] = (model.eval(), record)
    return d.rounded[(n, levels)]


def unrounded_twin(d: VisionDistilled, rounded: torch.nn.Module) -> torch.nn.Module:
    """Return the student folded as `rounded_student` folds it, before GPTQ: the same modules and parameter names (a
    bias GPTQ added is zero here) with the float weights. The accuracy search takes a node it keeps in float from it
    (weights rounded for int8 inputs are no use in float: measured on MobileNetV2, the GPTQ-rounded graph in float
    agreed 0.836 with the teacher, below the 0.9 budget, so no node kept in float could reach it)."""
    twin = copy.deepcopy(d.trained.student).eval()
    fold_batchnorm(twin, _example(d.size))
    for m, r in zip(twin.modules(), rounded.modules()):
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is None and getattr(r, "bias", None) is not None:
            m.bias = torch.nn.Parameter(torch.zeros_like(r.bias))
    return twin


def _save_rounded(directory: Path, model: torch.nn.Module, record: dict) -> None:
    """Store a rounded student (safetensors) and its record (JSON), atomically."""
    from safetensors.torch import save_file

    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "student.safetensors"))
    (tmp / "record.json").write_text(json.dumps(record), encoding="utf-8")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def _load_rounded(directory: Path, model: torch.nn.Module) -> dict | None:
    """Load a cached rounded student into `model` (BatchNorm folded; the biases round_weights adds are added here
    first); return its record, or None when there is none (or a bad one)."""
    from safetensors.torch import load_file

    try:
        record = json.loads((directory / "record.json").read_text(encoding="utf-8"))
        state = load_file(str(directory / "student.safetensors"))
        for name, m in model.named_modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is None and f"{name}.bias" in state:
                m.bias = torch.nn.Parameter(torch.zeros(m.weight.shape[0]))
        model.load_state_dict(state)
    except Exception:  # noqa: BLE001  missing, truncated or foreign entry: round again
        return None
    return {**record, "cached": True}
