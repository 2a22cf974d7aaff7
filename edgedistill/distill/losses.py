"""Distillation losses: small pure functions of student outputs, teacher outputs and labels."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Return MSE plus (1 - cosine) between student and teacher embeddings, batch mean.

    Cosine aligns direction (what retrieval uses); MSE also pins the scale for teachers that do not normalize.
    """
    cosine = F.cosine_similarity(student, teacher, dim=-1)
    return F.mse_loss(student, teacher) + (1.0 - cosine).mean()


def token_state_loss(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Return, over the real tokens (mask 1), MSE / mean(teacher²) plus (1 - cosine) between the student's and the
    teacher's last-layer token states: the per-token signal that pooling averages away (0 for equal states)."""
    real = attention_mask.bool()
    s, t = student[real].float(), teacher[real].float()
    return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12) + (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def classification_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                        temperature: float, label_weight: float) -> torch.Tensor:
    """Return Hinton's soft-target loss KL(teacher_T || student_T) * T^2, plus label_weight * CE when labels exist."""
    t = temperature
    kd = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                  reduction="batchmean", log_target=True) * (t * t)
    if labels is None:
        return kd
    return (1.0 - label_weight) * kd + label_weight * F.cross_entropy(student_logits, labels)


def fidelity(student: torch.Tensor, teacher: torch.Tensor, task: str) -> float:
    """Return the validation fidelity: mean cosine (embeddings) or top-1 agreement (classification)."""
    if task == "text-classification":
        return (student.argmax(-1) == teacher.argmax(-1)).float().mean().item()
    return F.cosine_similarity(student, teacher, dim=-1).mean().item()


# --- causal LMs: the teacher's next-token distribution is cached as top-k log-probs + the tail's log-mass.

def topk_bins(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_idx: torch.Tensor,
              teacher_tail: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (teacher, student) log-probabilities over k + 1 bins: the teacher's top-k tokens and the rest.

    The student's bins are its softmax gathered at the teacher's top-k ids plus its remaining mass. At temperature
    1 both are exact; otherwise both sides' k + 1 bins are tempered alike (the tail as one bin: its inside is not
    cached), so a student equal to the teacher still has zero loss. Shapes: logits (..., V); logp, idx (..., k);
    tail (...).
    """
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    logq_k = logq.gather(-1, teacher_idx.long())
    logq_tail = torch.log1p(-torch.exp(torch.logsumexp(logq_k, dim=-1)).clamp(max=1 - 1e-6))
    student_bins = torch.cat([logq_k, logq_tail.unsqueeze(-1)], dim=-1)
    teacher_bins = torch.cat([teacher_logp.float(), teacher_tail.float().unsqueeze(-1)], dim=-1)
    if temperature != 1.0:
        teacher_bins = torch.log_softmax(teacher_bins / temperature, dim=-1)
        student_bins = torch.log_softmax(student_bins / temperature, dim=-1)
    return teacher_bins, student_bins


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last axis, for log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(teacher_bins: torch.Tensor, student_bins: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position: mode-covering, the classic soft-label loss."""
    return _kl(teacher_bins, student_bins)


def reverse_kl(teacher_bins: torch.Tensor, student_bins: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) per position: mode-seeking (MiniLLM)."""
    return _kl(student_bins, teacher_bins)


def generalized_jsd(teacher_bins: torch.Tensor, student_bins: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """GKD's generalized Jensen-Shannon divergence per position: beta KL(p || m) + (1 - beta) KL(q || m), with
    m = beta p + (1 - beta) q; beta -> 0 tends to forward KL, beta -> 1 to reverse KL (after scaling)."""
    if beta <= 0.0:
        return forward_kl(teacher_bins, student_bins)
    if beta >= 1.0:
        return reverse_kl(teacher_bins, student_bins)
    log_m = torch.logsumexp(torch.stack([teacher_bins + math.log(beta), student_bins + math.log(1 - beta)]), dim=0)
    return beta * _kl(teacher_bins, log_m) + (1 - beta) * _kl(student_bins, log_m)


LM_DIVERGENCES = {"forward-kl": forward_kl, "reverse-kl": reverse_kl, "jsd": generalized_jsd}


def lm_distillation_loss(student_logits: torch.Tensor, input_ids: torch.Tensor, teacher_logp: torch.Tensor,
                         teacher_idx: torch.Tensor, teacher_tail: torch.Tensor, divergence: str = "forward-kl",
                         temperature: float = 1.0, ce_weight: float = 0.0, beta: float = 0.5) -> torch.Tensor:
    """Return mean over positions of divergence(teacher, student) * T^2, plus ce_weight * next-token cross-entropy
    on the data (positions 0..L-2 predict tokens 1..L-1)."""
    t_bins, s_bins = topk_bins(student_logits, teacher_logp, teacher_idx, teacher_tail, temperature)
    if divergence == "jsd":
        kd = generalized_jsd(t_bins, s_bins, beta)
    else:
        kd = LM_DIVERGENCES[divergence](t_bins, s_bins)
    loss = kd.mean() * (temperature * temperature)
    if ce_weight:
        ce = F.cross_entropy(student_logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten())
        loss = (1.0 - ce_weight) * loss + ce_weight * ce
    return loss


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Return the mean over stages of MSE(student, teacher) / mean(teacher²): each stage weighs the same whatever
    the scale of its activations (1.0 is as far as predicting zeros)."""
    return torch.stack([F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12) for s, t in zip(student, teacher)]).mean()
