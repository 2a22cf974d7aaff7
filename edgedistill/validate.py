"""Validation of the artifact against the teacher on the held-out split, and the accuracy-budget check."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgedistill.targets import AccuracyBudget


@dataclass
class Validation:
    """Fidelity metrics of an artifact vs the teacher (and vs the torch student), and the budget verdict."""

    metrics: dict[str, float]
    passed: bool
    verdict: str


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-12)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def fidelity_metrics(outputs: np.ndarray, teacher_outputs: np.ndarray, task: str,
                     labels: np.ndarray | None = None) -> dict[str, float]:
    """Return fidelity of `outputs` to `teacher_outputs`: cosine stats (embeddings) or agreement/KL/accuracy (logits)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    teacher_outputs = np.asarray(teacher_outputs, dtype=np.float64)
    if task == "text-classification":
        lp_s, lp_t = _log_softmax(outputs), _log_softmax(teacher_outputs)
        m = {
            "top1_agreement": float(np.mean(outputs.argmax(1) == teacher_outputs.argmax(1))),
            "kl_mean": float(np.mean(np.sum(np.exp(lp_t) * (lp_t - lp_s), axis=1))),
        }
        if labels is not None:
            m["accuracy"] = float(np.mean(outputs.argmax(1) == labels))
            m["teacher_accuracy"] = float(np.mean(teacher_outputs.argmax(1) == labels))
        return m
    cos = _cosines(outputs, teacher_outputs)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "cosine_p5": float(np.percentile(cos, 5))}


def primary_metric(task: str, budget: AccuracyBudget) -> tuple[str, float]:
    """Return the metric the budget holds for this task, and its floor."""
    if task == "text-classification":
        return "top1_agreement", budget.min_top1_agreement
    return "cosine_mean", budget.min_cosine


def check_budget(metrics: dict[str, float], task: str, budget: AccuracyBudget) -> tuple[bool, str]:
    """Return (passed, one-line verdict) of the metrics against the profile's budget."""
    key, floor = primary_metric(task, budget)
    name, value = {"top1_agreement": "top-1 agreement", "cosine_mean": "mean cosine"}[key], metrics[key]
    if value >= floor:
        return True, f"{name} to the teacher {value:.4f} >= budget {floor:g}"
    return False, f"{name} to the teacher {value:.4f} is {floor - value:.4f} below the budget {floor:g}"


def validate(artifact_outputs: np.ndarray, teacher_outputs: np.ndarray, student_outputs: np.ndarray, task: str,
             budget: AccuracyBudget, labels: np.ndarray | None = None) -> Validation:
    """Return the artifact's fidelity to the teacher, its distance to the torch student, and the budget verdict."""
    metrics = fidelity_metrics(artifact_outputs, teacher_outputs, task, labels)
    for k, v in fidelity_metrics(student_outputs, teacher_outputs, task, labels).items():
        metrics[f"torch_student_{k}"] = v
    metrics["max_abs_diff_vs_torch_student"] = float(np.max(np.abs(artifact_outputs - student_outputs)))
    passed, verdict = check_budget(metrics, task, budget)
    return Validation(metrics, passed, verdict)


def retrieval_agreement(outputs: np.ndarray, teacher_outputs: np.ndarray, k: int = 10) -> float:
    """Return the mean share of each text's k nearest neighbours (cosine, within the set) shared with the teacher's."""
    def neighbours(x: np.ndarray) -> np.ndarray:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argpartition(-sim, kth=min(k, len(x) - 1) - 1, axis=1)[:, :k]

    k = min(k, len(outputs) - 1)
    if k < 1:
        return float("nan")
    ours, theirs = neighbours(np.asarray(outputs, np.float64)), neighbours(np.asarray(teacher_outputs, np.float64))
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ours, theirs)]))
