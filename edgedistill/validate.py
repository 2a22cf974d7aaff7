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


# --- causal LMs: logits over held-out windows against the teacher's cached top-k distributions.

class LMMetricsAccumulator:
    """Accumulates, window batch by window batch, a model's next-token fidelity to the teacher's cached labels:
    perplexity on the data (and the teacher's, from its cached log-prob of each actual next token), top-1 agreement
    with the teacher, and KL(teacher || model) over the teacher's top-k tokens plus the tail as one bin."""

    def __init__(self) -> None:
        self.nll = self.teacher_nll = self.kl = 0.0
        self.agree = self.tokens = 0

    def add(self, logits: np.ndarray, windows: np.ndarray, labels: np.ndarray) -> None:
        """Add a batch: logits (B, L, V), token windows (B, L), label rows (B,) of the family's label dtype."""
        z = np.asarray(logits, dtype=np.float32)[:, :-1]
        z = z - z.max(-1, keepdims=True)
        logq = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nxt = np.asarray(windows)[:, 1:]
        self.nll -= float(np.take_along_axis(logq, nxt[..., None], -1).sum())
        self.teacher_nll -= float(np.asarray(labels["target"], dtype=np.float64)[:, :-1].sum())
        idx = np.asarray(labels["idx"], dtype=np.int64)[:, :-1]
        self.agree += int((logq.argmax(-1) == idx[..., 0]).sum())
        logp_k = np.asarray(labels["logp"], dtype=np.float64)[:, :-1]
        tail = np.asarray(labels["tail"], dtype=np.float64)[:, :-1]
        logq_k = np.take_along_axis(logq, idx, -1)
        logq_tail = np.log(np.clip(1.0 - np.exp(logq_k).sum(-1), 1e-12, None))
        p_k, p_tail = np.exp(logp_k), np.exp(tail)
        self.kl += float((p_k * (logp_k - logq_k)).sum() + (p_tail * (tail - logq_tail)).sum())
        self.tokens += nxt.size

    def metrics(self) -> dict[str, float]:
        ppl, teacher_ppl = float(np.exp(self.nll / self.tokens)), float(np.exp(self.teacher_nll / self.tokens))
        return {"perplexity": ppl, "teacher_perplexity": teacher_ppl, "perplexity_ratio": ppl / teacher_ppl,
                "top1_agreement": self.agree / self.tokens, "kl_teacher_topk_mean": self.kl / self.tokens,
                "tokens": float(self.tokens)}


def lm_metrics(logits_of, windows: np.ndarray, labels: np.ndarray, batch_tokens: int = 1024) -> dict[str, float]:
    """Return the LM metrics of `logits_of(int64 windows (B, L)) -> logits (B, L, V)` on windows and their labels,
    `batch_tokens` tokens a call (full-vocabulary logits are the memory peak)."""
    acc = LMMetricsAccumulator()
    batch = max(1, batch_tokens // max(1, np.asarray(windows).shape[1]))
    for start in range(0, len(windows), batch):
        w = np.asarray(windows[start : start + batch], dtype=np.int64)
        acc.add(logits_of(w), w, np.asarray(labels[start : start + batch]))
    return acc.metrics()


def greedy_agreement(ours: list[list[int]], teacher: list[list[int]]) -> dict[str, float]:
    """Return how far greedy continuations agree with the teacher's: the mean share of tokens equal position by
    position, and the mean share before the first difference."""
    same, prefix = [], []
    for a, b in zip(ours, teacher):
        n = max(len(b), 1)
        same.append(sum(x == y for x, y in zip(a, b)) / n)
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(first / n)
    return {"greedy_token_agreement": float(np.mean(same)), "greedy_prefix_agreement": float(np.mean(prefix))}


def check_lm_budget(metrics: dict[str, float], budget) -> tuple[bool, str]:
    """Return (passed, one-line verdict) of a language model's metrics against its LMBudget."""
    ratio, agree = metrics["perplexity_ratio"], metrics["top1_agreement"]
    misses = []
    if ratio > budget.max_perplexity_ratio:
        misses.append(f"perplexity {ratio:.3f}x the teacher's is above the budget {budget.max_perplexity_ratio:g}x")
    if agree < budget.min_top1_agreement:
        misses.append(f"top-1 agreement {agree:.4f} is below the budget {budget.min_top1_agreement:g}")
    if misses:
        return False, "; ".join(misses)
    return True, (f"perplexity {ratio:.3f}x the teacher's <= {budget.max_perplexity_ratio:g}x, top-1 agreement "
                  f"{agree:.4f} >= {budget.min_top1_agreement:g}")
