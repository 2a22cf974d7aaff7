"""Width pruning shared by the transformer families: each FFN neuron ranked by its mean |activation| on calibration
inputs (Minitron's activation importance), the most important kept by slicing the projections that make it (rows)
and the one that consumes it (columns). A family says where its FFN projections are; the ranking and slicing are here."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

# a family's FFN of one layer: (input projections, rows = neurons; output projection, columns = neurons)
FfnParts = tuple[list[nn.Module], nn.Module]


def kept_width(width: int, ratio: float, multiple: int = 32) -> int:
    """Return how many of `width` neurons a `ratio` keeps: a multiple of `multiple` (int8/int4 kernels and blocks
    want it), at least one multiple, at most all."""
    return min(width, max(multiple, int(round(width * ratio / multiple)) * multiple))


@torch.no_grad()
def neuron_importance(parts: Sequence[FfnParts], feed: Callable[[], int]) -> list[torch.Tensor]:
    """Return, per FFN, each neuron's mean |activation| (the output projection's input) over what `feed()` runs
    through the model; `feed` returns the number of positions it ran (the mean's denominator)."""
    sums: list[torch.Tensor | None] = [None] * len(parts)

    def hook(i):
        def fn(module, args):
            x = args[0].detach().float().abs().flatten(0, -2).sum(0)
            sums[i] = x if sums[i] is None else sums[i] + x
        return fn

    handles = [output.register_forward_pre_hook(hook(i)) for i, (_, output) in enumerate(parts)]
    try:
        positions = feed()
    finally:
        for h in handles:
            h.remove()
    return [s / max(positions, 1) for s in sums]


@torch.no_grad()
def keep_neurons(parts: Sequence[FfnParts], importance: Sequence[torch.Tensor], keep: int) -> None:
    """Keep the `keep` most important neurons of every FFN, in place, in their original order. Linear weights are
    (out, in); transformers' Conv1D (GPT-2) stores (in, out)."""
    from transformers.pytorch_utils import Conv1D

    for (inputs, output), score in zip(parts, importance):
        idx = torch.sort(torch.topk(score, keep).indices).values
        for proj in inputs:
            if isinstance(proj, Conv1D):  # (in, out): neurons are columns
                proj.weight = nn.Parameter(proj.weight[:, idx].clone())
                proj.bias = nn.Parameter(proj.bias[idx].clone())
                proj.nf = keep
            else:
                proj.weight = nn.Parameter(proj.weight[idx].clone())
                if proj.bias is not None:
                    proj.bias = nn.Parameter(proj.bias[idx].clone())
                proj.out_features = keep
        if isinstance(output, Conv1D):
            output.weight = nn.Parameter(output.weight[idx].clone())
        else:
            output.weight = nn.Parameter(output.weight[:, idx].clone())
            output.in_features = keep
