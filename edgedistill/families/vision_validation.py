"""How faithful an image classifier is to its teacher: top-1 / top-5 agreement and KL on the held-out views, and
top-1's 95% interval when the held-out photos (not views: a photo's views are alike) are resampled."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

INTERVAL_RESAMPLES = 2000  # bootstrap resamples of the held-out images behind the verdict's 95% interval
VAL_PHOTOS = "validation-photos.npy"  # the artifact's file: the held-out photo (index) each validation view was cut from


def agreement(logits: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    """Return top-1 agreement, top-5 agreement (the teacher's top class among ours) and mean KL(teacher || ours)."""
    t = torch.from_numpy(np.array(teacher, dtype=np.float32))
    s = torch.from_numpy(np.array(logits, dtype=np.float32))
    top1 = (s.argmax(-1) == t.argmax(-1)).float().mean().item()
    k = min(5, s.shape[-1])
    top5 = (s.topk(k, -1).indices == t.argmax(-1, keepdim=True)).any(-1).float().mean().item()
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean").item()
    return {"top1_agreement": top1, "top5_agreement": top5, "kl_teacher": kl}


def agreement_interval(logits: np.ndarray, teacher: np.ndarray, groups: np.ndarray, resamples: int = INTERVAL_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Return the 95% interval of top-1 agreement when the held-out images are resampled with replacement (a
    bootstrap over images, not views: the views of one photo are alike, so they do not count as independent)."""
    hits = (logits.argmax(-1) == teacher.argmax(-1)).astype(np.float64)
    _, index = np.unique(groups, return_inverse=True)
    per_hits, per_views = np.bincount(index, hits), np.bincount(index).astype(np.float64)
    draw = np.random.default_rng(seed).integers(0, len(per_views), (resamples, len(per_views)))
    shares = per_hits[draw].sum(1) / per_views[draw].sum(1)
    low, high = np.quantile(shares, [0.025, 0.975])
    return float(low), float(high)
