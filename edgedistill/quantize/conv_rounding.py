"""Calibrated weight rounding for static int8 CNNs: each Conv / Linear weight is put on the per-channel int8 grid the
quantizer will use (scale = max |w| / 127 per output channel, as onnxruntime's QDQ and XNNPACK's PT2E quantizers
compute it; max |w| / 64 with onnxruntime's 7-bit weights, `reduce_range`), choosing each weight's rounding by the
layer's inputs rather than to the nearest level, and each bias is corrected for the mean error the rounding leaves.

Layer by layer, in the order the model runs, with every activation already rounded as the artifact rounds it
(`ConvQuantSim`, ranges calibrated on the quantizer's own calibration views):
  * GPTQ (Frantar et al., 2022): the weights of one output channel are rounded one input column at a time, and the
    error of each is spread over the columns not yet rounded through the inverse of H = X Xᵀ, X the layer's
    (rounded) input patches; a depthwise convolution gets one 9 x 9 H per channel. The largest |w| of each channel
    stays where it is (exactly ±127 levels, or ±64), so the quantizer recomputes the same scale and stores exactly
    these integers.
  * bias correction (Nagel et al., 2019): the bias gains W E[x] - Q E[x~], the mean of what the float layer on the
    float model's input and the rounded layer on the rounded model's input disagree by.

neural-compressor's and the GPTQ authors' implementations round Linear (and dense Conv) weights for weight-only LLM
quantization on their own grids; neither handles grouped convolutions or the artifact's rounded inputs, hence this
module. Measured on MobileNetV2 (README "Calibrated weight rounding").
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from edgedistill.distill.qat_conv import ConvQuantSim

DAMP = 0.01  # added to H's diagonal, as a share of its mean (GPTQ's default): H from few views is near-singular
BATCH = 16


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return the layer's input as (groups, values per output, positions): what each output channel's weights dot."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T[None]
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode="constant" if layer.padding_mode == "zeros"
                  else layer.padding_mode)
        padding = 0
    else:
        padding = layer.padding
    cols = F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)
    g = layer.groups
    b, d, n = cols.shape
    return cols.reshape(b, g, d // g, n).permute(1, 2, 0, 3).reshape(g, d // g, b * n)


def _float_input_means(model: nn.Module, layers: list[nn.Module], views: torch.Tensor) -> list[torch.Tensor]:
    """Return, for each layer, the mean of its input patches over `views` in the float model (one pass)."""
    sums: list[torch.Tensor | None] = [None] * len(layers)
    counts = [0] * len(layers)

    def hook_for(i: int):
        def hook(module, args):
            p = _patches(module, args[0].detach())
            s = p.sum(2)
            sums[i] = s if sums[i] is None else sums[i] + s
            counts[i] += p.shape[2]
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        for chunk in views.split(BATCH):
            model(chunk)
    finally:
        for h in handles:
            h.remove()
    return [s / c for s, c in zip(sums, counts)]


def _gptq(weight: torch.Tensor, h: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """Round `weight` (out, in) onto its per-channel symmetric grid of integers in [-levels, levels] by GPTQ with `h`
    (groups, in, in); the largest |w| of each row is kept (its own level, ±levels). Returns the rounded float
    weight."""
    rows, cols = weight.shape
    groups = h.shape[0]
    scale = weight.abs().amax(1) / float(levels)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).reshape(groups, rows // groups)
    w0 = weight.reshape(groups, rows // groups, cols)
    pin = w0.abs() == w0.abs().amax(2, keepdim=True)
    h = h.clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)
    diag += DAMP * diag.mean(1, keepdim=True) + 1e-8
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w = w0.clone()
    q = torch.empty_like(w)
    for i in range(cols):
        col = w[:, :, i]
        rounded = torch.where(pin[:, :, i], w0[:, :, i], torch.clamp(torch.round(col / scale), -levels, levels) * scale)
        q[:, :, i] = rounded
        err = torch.where(pin[:, :, i], torch.zeros_like(col), (col - rounded) / hinv[:, i, i, None])
        w[:, :, i + 1:] -= err[:, :, None] * hinv[:, i, None, i + 1:]
        w[:, :, i + 1:] = torch.where(pin[:, :, i + 1:], w0[:, :, i + 1:], w[:, :, i + 1:])
    return q.reshape(rows, cols)


def round_weights(model: nn.Module, example: torch.Tensor, calibration: torch.Tensor, views: torch.Tensor,
                  on_layer=None, levels: int = 127) -> dict:
    """Round every Conv2d / Linear weight of a BatchNorm-folded `model` onto its int8 grid by GPTQ and correct each
    bias, in place (module in float; the quantizer then stores exactly these weights). `calibration`: the views the
    quantizer calibrates its activation ranges on (the simulation uses the same); `views`: the views H and the means
    are measured on. `on_layer(done, total)` reports progress. `levels`: the weights' integer range, 127 or 64 (7-bit
    weights, `reduce_range`). Returns what was done, for the manifest."""
    start = time.perf_counter()
    model.eval()
    reference = copy.deepcopy(model)
    float_layers = [m for m in reference.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        float_means = _float_input_means(reference, float_layers, views)
    del reference
    sim = ConvQuantSim(model, example, weight_levels=levels)
    rounded: set[int] = set()

    def round_layer(layer, args):  # runs after the simulation's own pre-hook: `args[0]` is the rounded input
        if id(layer) in rounded:  # a layer called twice is rounded on its first call's input
            return
        h, mean_q, n = None, None, 0
        for chunk in args[0].detach().split(BATCH):
            p = _patches(layer, chunk)
            part = torch.einsum("gdn,gen->gde", p, p)
            h = part if h is None else h + part
            s = p.sum(2)
            mean_q = s if mean_q is None else mean_q + s
            n += p.shape[2]
        original = layer.parametrizations.weight.original
        weight = original.reshape(original.shape[0], -1)
        q = _gptq(weight, h, levels)
        groups = h.shape[0]
        shift = (torch.einsum("god,gd->go", weight.reshape(groups, -1, weight.shape[1]), float_means[index[id(layer)]])
                 - torch.einsum("god,gd->go", q.reshape(groups, -1, weight.shape[1]), mean_q / n))
        original.copy_(q.reshape(original.shape))
        if layer.bias is None:
            layer.bias = nn.Parameter(shift.reshape(-1).clone())
        else:
            layer.bias.add_(shift.reshape(-1))
        rounded.add(id(layer))
        if on_layer is not None:
            on_layer(len(rounded), len(sim.layers))

    index = {id(layer): i for i, layer in enumerate(sim.layers)}
    handles = []
    try:
        sim.calibrate(calibration)
        handles = [layer.register_forward_pre_hook(round_layer) for layer in sim.layers]
        with torch.no_grad():
            model(views)  # one pass: each layer is rounded as the views reach it, before it runs on them
        layers = len(rounded)
    finally:
        for handle in handles:
            handle.remove()
        sim.remove()
    return {"method": "gptq + bias correction, through the int8 simulation", "layers": layers,
            "views": len(views), "calibration_views": len(calibration), "damp": DAMP, "weight_levels": levels,
            "seconds": round(time.perf_counter() - start, 1)}
