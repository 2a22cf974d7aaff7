"""Re-run an artifact's validation: its model, in its runtime, on the held-out texts and teacher outputs the
artifact carries (validation-*.* files), compared with the manifest's recorded metrics and budget."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgedistill.artifact import Manifest
from edgedistill.errors import ArtifactError
from edgedistill.validate import check_budget, fidelity_metrics, primary_metric

VAL_TEXTS, VAL_TEACHER, VAL_LABELS = "validation-texts.jsonl", "validation-teacher.npy", "validation-labels.npy"
# The same model on the same kernels repeats to ~1e-7. Another machine's kernels (an x86 CPU without VNNI, a GPU
# artifact that compile validated on the GPU) differ slightly: allow 0.002 of mean cosine, or two texts' top-1 flips.
COSINE_TOLERANCE = 2e-3


@dataclass
class Revalidation:
    recorded: dict[str, float]
    measured: dict[str, float]
    metric: str
    passed: bool  # budget held now, and the primary metric repeats the recorded one within TOLERANCE
    verdict: str


def write_validation_set(directory: Path, texts: list[str], teacher: np.ndarray, labels: np.ndarray | None) -> dict[str, Path]:
    """Write the held-out split an artifact carries for `verify` (not needed on the device), and return its files."""
    files = {VAL_TEXTS: directory / VAL_TEXTS, VAL_TEACHER: directory / VAL_TEACHER}
    files[VAL_TEXTS].write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    np.save(files[VAL_TEACHER], np.ascontiguousarray(teacher, dtype=np.float32))
    if labels is not None:
        files[VAL_LABELS] = directory / VAL_LABELS
        np.save(files[VAL_LABELS], np.asarray(labels, dtype=np.int64))
    return files


def _runner(artifact_dir: Path, m: Manifest):
    path = artifact_dir / m.model["file"]
    if m.model["format"] == "pte":
        from edgedistill.backends.executorch import load_pte

        return load_pte(path)
    from edgedistill.runtimes.ort_cpu import cpu_session  # GPU artifacts too: compile validated them on these kernels

    session = cpu_session(path, 1)
    return lambda feeds: session.run(None, feeds)[0]


def revalidate(artifact_dir: Path, m: Manifest) -> Revalidation:
    """Run the artifact on its validation set; raise ArtifactError if it carries none."""
    from transformers import AutoTokenizer

    if m.family == "causal-lm":
        return revalidate_lm(artifact_dir, m)
    if m.family == "vision":
        return revalidate_vision(artifact_dir, m)

    from edgedistill.runtimes import predict_with
    from edgedistill.targets import AccuracyBudget

    if VAL_TEXTS not in m.files or VAL_TEACHER not in m.files:
        raise ArtifactError(f"{artifact_dir} carries no validation set", hint="artifacts compiled by edgedistill >= 0.2 do; re-run compile")
    texts = [json.loads(line) for line in (artifact_dir / VAL_TEXTS).read_text(encoding="utf-8").splitlines()]
    teacher = np.load(artifact_dir / VAL_TEACHER, allow_pickle=False)
    labels = np.load(artifact_dir / VAL_LABELS, allow_pickle=False) if VAL_LABELS in m.files else None
    tokenizer = AutoTokenizer.from_pretrained(artifact_dir)
    inputs = m.model["inputs"]
    dims = inputs[0]["shape"][:2]
    fixed = (dims[0], dims[1]) if all(isinstance(d, int) for d in dims) else None
    out = predict_with(_runner(artifact_dir, m), tokenizer, texts, [i["name"] for i in inputs], m.data["max_length"], fixed)
    task = m.teacher["task"]
    measured = fidelity_metrics(out, teacher, task, labels)
    budget = AccuracyBudget(**m.metrics["budget"])
    metric, _ = primary_metric(task, budget)
    recorded = {k: v for k, v in m.metrics["values"].items() if k in measured}
    within_budget, verdict = check_budget(measured, task, budget)
    drift = abs(measured[metric] - recorded[metric])
    tolerance = COSINE_TOLERANCE if metric == "cosine_mean" else 2.0 / len(texts) + 1e-9
    if drift > tolerance:
        verdict += f"; but {metric} differs from the recorded {recorded[metric]:.4f} by {drift:.4f} (tolerance {tolerance:.4f})"
    return Revalidation(recorded, measured, metric, within_budget and drift <= tolerance, verdict)


# --- causal LMs: held-out token windows and the teacher's cached label rows for them.
VAL_WINDOWS = "validation-windows.npy"
LM_TOLERANCE = {"perplexity_ratio": 0.01, "top1_agreement": 0.005}  # other machines' int4 kernels differ slightly


def write_lm_validation_set(directory: Path, windows: np.ndarray, labels: np.ndarray) -> dict[str, Path]:
    """Write the held-out windows and the teacher's label rows an LM artifact carries for `verify`."""
    files = {VAL_WINDOWS: directory / VAL_WINDOWS, VAL_TEACHER: directory / VAL_TEACHER}
    np.save(files[VAL_WINDOWS], np.ascontiguousarray(windows, dtype=np.int32))
    np.save(files[VAL_TEACHER], np.ascontiguousarray(labels))
    return files


def revalidate_lm(artifact_dir: Path, m: Manifest) -> Revalidation:
    """Re-run an LM artifact's held-out windows and compare perplexity ratio and top-1 agreement with the record."""
    from edgedistill.runtimes.ort_lm import OrtCausalLM
    from edgedistill.targets import LMBudget
    from edgedistill.validate import check_lm_budget, lm_metrics

    if VAL_WINDOWS not in m.files or VAL_TEACHER not in m.files:
        raise ArtifactError(f"{artifact_dir} carries no validation set", hint="re-run compile")
    windows = np.load(artifact_dir / VAL_WINDOWS, allow_pickle=False)
    labels = np.load(artifact_dir / VAL_TEACHER, allow_pickle=False)
    runner = OrtCausalLM(artifact_dir / m.model["file"], threads=1)
    measured = {k: v for k, v in lm_metrics(runner.logits, windows, labels).items() if k != "tokens"}
    recorded = {k: v for k, v in m.metrics["values"].items() if k in measured}
    passed, verdict = check_lm_budget(measured, LMBudget(**m.metrics["budget"]))
    for key, tolerance in LM_TOLERANCE.items():
        drift = abs(measured[key] - recorded[key])
        if drift > tolerance:
            passed = False
            verdict += f"; but {key} differs from the recorded {recorded[key]:.4f} by {drift:.4f} (tolerance {tolerance})"
    return Revalidation(recorded, measured, "perplexity_ratio", passed, verdict)


# --- image classifiers: held-out views (uint8 NCHW) and the teacher's logits on them.
VAL_VIEWS = "validation-views.npy"


def revalidate_vision(artifact_dir: Path, m: Manifest) -> Revalidation:
    """Re-run a vision artifact on its held-out views and compare top-1 agreement with the record."""
    from edgedistill.families.vision_build import run_onnx
    from edgedistill.families.vision_validation import VAL_PHOTOS, agreement, agreement_interval
    from edgedistill.runtimes.ort_cpu import cpu_session

    if VAL_VIEWS not in m.files or VAL_TEACHER not in m.files:
        raise ArtifactError(f"{artifact_dir} carries no validation set", hint="re-run compile")
    views = np.load(artifact_dir / VAL_VIEWS, allow_pickle=False)
    teacher = np.load(artifact_dir / VAL_TEACHER, allow_pickle=False)
    path = artifact_dir / m.model["file"]
    if path.suffix == ".pte":
        from edgedistill.families.vision_build import PteSession

        session = PteSession(path, tuple(m.model["input_shape"]))
    else:
        session = cpu_session(path, 1)
    logits = run_onnx(session, views)
    measured = agreement(logits, teacher)
    recorded = {k: v for k, v in m.metrics["values"].items() if k in measured}
    floor = m.metrics["budget"]["min_top1_agreement"]
    passed = measured["top1_agreement"] >= floor
    verdict = f"top-1 agreement {measured['top1_agreement']:.4f} {'≥' if passed else '<'} the budget's {floor:g}"
    if VAL_PHOTOS in m.files:
        low, high = agreement_interval(logits, teacher, np.load(artifact_dir / VAL_PHOTOS, allow_pickle=False))
        measured.update(top1_agreement_low95=low, top1_agreement_high95=high)
        recorded.update({k: v for k, v in m.metrics["values"].items() if k in ("top1_agreement_low95", "top1_agreement_high95")})
        verdict += f" (95% interval over the held-out photos {low:.2f}–{high:.2f})"
    drift = abs(measured["top1_agreement"] - recorded["top1_agreement"])
    tolerance = 2.0 / len(views) + 1e-9  # another machine's int8 kernels may flip a view or two
    if drift > tolerance:
        passed = False
        verdict += f"; but top1_agreement differs from the recorded {recorded['top1_agreement']:.4f} by {drift:.4f}"
    return Revalidation(recorded, measured, "top1_agreement", passed, verdict)
