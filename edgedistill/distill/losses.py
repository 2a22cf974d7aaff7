"""Distillation losses: small pure functions of student outputs, teacher outputs and labels."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Return MSE plus (1 - cosine) between student and teacher embeddings, batch mean.

    Cosine aligns direction (what retrieval uses); MSE also pins the scale for teachers that do not normalize.
    """
    cosine = F.cosine_similarity(student, teacher, dim=-1)
    return F.mse_loss(student, teacher) + (1.0 - cosine).mean()


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
