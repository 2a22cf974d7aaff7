"""PyTorch eager runtime: the teacher and the torch student."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgedistill.progress import track
from edgedistill.runtimes import iter_batches, num_batches


@torch.inference_mode()
def predict(module: nn.Module, tokenizer, texts: list[str], input_names: list[str], max_length: int,
            batch_size: int = 64, description: str | None = None) -> np.ndarray:
    """Return the module's float32 outputs for `texts`, one row per text, in the order given."""
    module.eval()
    out = None
    batches = iter_batches(tokenizer, texts, input_names, max_length, batch_size)
    if description:
        batches = track(batches, num_batches(len(texts), batch_size), description)
    for idx, inputs in batches:
        device = next(module.parameters()).device
        y = module(**{k: torch.from_numpy(v).to(device) for k, v in inputs.items()}).float().cpu().numpy()
        if out is None:
            out = np.empty((len(texts), y.shape[-1]), dtype=np.float32)
        out[idx] = y
    return out
