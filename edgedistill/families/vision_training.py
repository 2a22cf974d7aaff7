"""How a vision student trains: the loop's view of logit distillation (KL to the teacher's cached or fresh logits,
labels, feature matching), and when a quantization-aware student goes through the simulated int8 rounding."""
from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from edgedistill.cache import Rows
from edgedistill.distill.feature_matching import TeacherStages, on_device
from edgedistill.distill.losses import feature_loss
from edgedistill.distill.loop import Training
from edgedistill.distill.qat_conv import ConvQuantSim
from edgedistill.families.vision_validation import agreement
from edgedistill.images import make_views, to_pixels

RECALIBRATE_EVERY = 16  # quantization-aware training re-measures the activation ranges this often (steps)


class QuantizationAwareSchedule:
    """When the student trains through the simulated int8 rounding: in float until step `start`, then through the
    rounding (ranges re-measured on the calibration views every RECALIBRATE_EVERY steps). Validation always goes
    through the rounding, so the best step is the best int8 student whichever phase it is in."""

    def __init__(self, sim: ConvQuantSim, calibration: torch.Tensor, start: int) -> None:
        self.sim, self.calibration, self.start = sim, calibration, start

    def before_step(self, step: int) -> None:
        if step < self.start:
            self.sim.enabled = False
            return
        if step == self.start or (step - self.start) % RECALIBRATE_EVERY == 0:
            self.sim.calibrate(self.calibration)
        self.sim.enabled = True

    @contextmanager
    def evaluating(self):
        previous = self.sim.enabled
        self.sim.calibrate(self.calibration)
        self.sim.enabled = True
        try:
            yield
        finally:
            self.sim.enabled = previous


@dataclass
class FreshViews:
    """Function matching: each step draws new training crops of the photos (seeded from torch's global RNG, which
    a resumed run restores) and the teacher labels them in the loop, optionally mixed up (the teacher sees the same
    mixed images: Beyer et al., "Knowledge distillation: A good teacher is patient and consistent")."""

    images: list[np.ndarray]  # the training photos
    source: np.ndarray  # the photo of each training example index
    size: int
    crop_scale: float
    teacher: torch.nn.Module
    mixup_alpha: float = 0.0

    def batch(self, idx: np.ndarray, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Return (pixels, teacher logits) of fresh views of the photos behind `idx`, on `device` (the teacher runs
        there: a copy of it is moved once)."""
        from edgedistill.images import mixup

        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        views = np.concatenate([make_views([self.images[self.source[i]]], 1, self.size, seed + k, True, self.crop_scale)[0]
                                for k, i in enumerate(idx)])
        x = to_pixels(views)
        if self.mixup_alpha > 0:
            x, _, _ = mixup(x, self.mixup_alpha, torch.Generator().manual_seed(seed))
        x = x.to(device)
        self.teacher = on_device(self.teacher, x.device)
        with torch.no_grad():
            logits = self.teacher.eval()(x).float()
        return x, logits


def vision_training(train_views: np.ndarray, train_logits: np.ndarray, train_labels: np.ndarray | None,
                    val_views: np.ndarray, val_logits: np.ndarray, cfg,
                    schedule: QuantizationAwareSchedule | None = None, fresh: FreshViews | None = None,
                    features: tuple[TeacherStages, float] | None = None) -> Training:
    """Return the loop's view of logit distillation: KL at temperature T (T² scaled) to the teacher's logits (cached
    on the fixed training views, or computed on fresh views each step with `fresh`), plus `label_weight`
    cross-entropy when labels exist, plus (with `features`: the teacher's stages and a weight) the weighted
    feature-matching loss of a FeatureMatched student; validation top-1 agreement (higher is better), through the
    int8 rounding when `schedule` says the student is distilled quantization-aware."""
    rows = Rows(train_logits, np.arange(len(train_views)))
    calls = [0]
    t = cfg.temperature
    val_x = torch.from_numpy(np.asarray(val_views[:512])).float() / 255.0

    def collate(indices):
        idx = np.sort(np.asarray(indices))
        batch = {"index": torch.from_numpy(idx)} if fresh is not None else {
            "pixels": torch.from_numpy(train_views[idx]).float() / 255.0, "teacher": torch.from_numpy(np.asarray(rows[idx]))}
        if train_labels is not None:
            batch["labels"] = torch.from_numpy(train_labels[idx].astype(np.int64))
        return batch

    def loss(model, batch):
        if schedule is not None:
            schedule.before_step(calls[0])
        calls[0] += 1
        if fresh is not None:  # drawn here, after the loop fetched the batch (and restored a resumed run's RNG)
            batch["pixels"], batch["teacher"] = fresh.batch(batch["index"].numpy(), next(model.parameters()).device)
        logits = model(batch["pixels"]).float()
        kd = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(batch["teacher"] / t, -1), log_target=True,
                      reduction="batchmean") * t * t
        if "labels" in batch:
            kd = (1 - cfg.label_weight) * kd + cfg.label_weight * F.cross_entropy(logits, batch["labels"])
        if features is None:
            return kd
        teacher_stages, weight = features
        _, theirs = teacher_stages(batch["pixels"])
        return kd + weight * feature_loss(getattr(model, "module", model).take_projected(), theirs)

    def evaluate(model) -> float:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad(), schedule.evaluating() if schedule is not None else contextlib.nullcontext():
            out = torch.cat([model(x.to(device)).float().cpu() for x in val_x.split(64)]).numpy()
        return agreement(out, val_logits[: len(out)])["top1_agreement"]

    return Training(lengths=[1] * len(train_views), collate=collate, loss=loss, evaluate=evaluate, maximize=True,
                    describe=lambda a: f"top-1 agreement {a:.4f}")
