"""Quantization-aware distillation for CNNs: the student trains through the static int8 rounding onnxruntime's QDQ
quantizer will apply to it.

onnxruntime quantizes (op types Conv, Gemm, Clip; per-channel int8 weights; uint8 activations; min-max ranges):
  * each Conv / Gemm weight per output channel, symmetric: scale = max |w| / 127, integers in [-127, 127] (max |w| /
    64 and [-64, 64] with 7-bit weights, `reduce_range`);
  * the input of every Conv / Gemm and its output, asymmetric uint8 over [min(lo, 0), max(hi, 0)] of the values
    seen on the calibration inputs; a Conv followed by ReLU6 / ReLU is fused with it (the Clip is removed and the
    output is quantized over the activation's range).
BatchNorm is folded into the convolution before all this (the exporter folds it too), so the student trains the
weights the artifact stores. `ConvQuantSim` reproduces those roundings in the forward pass with straight-through
gradients; activation ranges are re-measured on the same calibration inputs onnxruntime will use, so after training
the quantizer lands on the grid the student learned.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_QUANTIZED = (nn.Conv2d, nn.Linear)
_CLAMPS = {nn.ReLU6: (0.0, 6.0), nn.ReLU: (0.0, None)}


def _leaf_calls(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Module, int | None]]:
    """Run `model` once and return its leaf-module calls in order as (module, index of the call that produced its
    input, None for the model's input or a functional op's result). In-place activations (ReLU6(inplace=True))
    count as producing a new value; pass-through modules (Identity, Dropout in eval) are left out."""
    calls: list[tuple[nn.Module, int | None]] = []
    latest: dict[int, int] = {}  # id of a tensor object -> the call whose output it last held
    keep = []

    def hook(module, args, output):
        if not (args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor)):
            return
        if output is args[0] and type(module) not in _CLAMPS:
            return
        keep.extend((args[0], output))  # keep the tensors alive so their ids are not reused
        calls.append((module, latest.get(id(args[0]))))
        latest[id(output)] = len(calls) - 1

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return calls


def _consumers(calls: list[tuple[nn.Module, int | None]]) -> dict[int, list[nn.Module]]:
    found: dict[int, list[nn.Module]] = {}
    for module, source in calls:
        if source is not None:
            found.setdefault(source, []).append(module)
    return found


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> int:
    """Fold every BatchNorm2d whose input is a Conv2d's output (its only consumer among the modules) into that
    convolution, in place (the BatchNorm becomes Identity). Returns how many were folded; raises if the folded
    model's output differs, since a convolution output also used elsewhere would make the fold wrong."""
    model.eval()
    calls = _leaf_calls(model, example)
    consumers = _consumers(calls)
    with torch.no_grad():
        before = model(example)
    done: list[tuple[nn.Module, nn.Module]] = []  # (new, old): to undo
    for module, source in calls:
        conv = None if source is None else calls[source][0]
        if isinstance(module, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d) and len(consumers[source]) == 1:
            fused, identity = fuse_conv_bn_eval(conv, module), nn.Identity()
            _replace(model, conv, fused)
            _replace(model, module, identity)
            done += [(fused, conv), (identity, module)]
    with torch.no_grad():
        after = model(example)
    if not torch.allclose(before, after, rtol=1e-3, atol=1e-3 * float(before.abs().max())):
        for new, old in reversed(done):
            _replace(model, new, old)
        raise RuntimeError(f"folding BatchNorm changed the output by {float((before - after).abs().max()):.3g}")
    return len(done) // 2


def round_per_channel(weight: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """Return `weight` rounded as onnxruntime stores per-channel symmetric int8: scale = max |w| / levels per output
    channel (axis 0), integers in [-levels, levels] (127; 64 with 7-bit weights, `reduce_range`)."""
    flat = weight.reshape(weight.shape[0], -1)
    scale = flat.abs().amax(1, keepdim=True) / float(levels)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.round(flat / safe), -levels, levels) * scale).reshape(weight.shape)


def fake_quant_uint8(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Round `x` onto onnxruntime's asymmetric uint8 grid over [min(lo, 0), max(hi, 0)], straight-through."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return x
    scale = (hi - lo) / 255.0
    zero = round(-lo / scale)
    q = (torch.clamp(torch.round(x.detach() / scale) + zero, 0, 255) - zero) * scale
    return x + (q - x).detach()


class ConvQuantSim:
    """Hooks on a BN-folded CNN that make its forward pass see the QDQ int8 artifact's roundings.

    `calibrate(views)` measures the activation ranges on float inputs (as onnxruntime's min-max calibrator does);
    `enabled` switches the rounding on or off; `remove()` takes every hook away (the float weights stay).
    `weight_levels`: the weights' integer range, [-127, 127] or [-64, 64] (7-bit, `reduce_range`).
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, weight_levels: int = 127) -> None:
        self.model = model
        calls = _leaf_calls(model, example)
        consumers = _consumers(calls)
        self.layers = [m for m in model.modules() if isinstance(m, _QUANTIZED)]
        self.clamp: dict[nn.Module, tuple[float, float | None]] = {}
        for index, (m, _) in enumerate(calls):  # a Conv whose only consumer is ReLU6 / ReLU is fused with it
            after = consumers.get(index, [])
            if isinstance(m, _QUANTIZED) and len(after) == 1 and type(after[0]) in _CLAMPS:
                self.clamp[m] = _CLAMPS[type(after[0])]
        self.ranges: dict[tuple[int, str], list[float]] = {}
        self._switch = _Switch()
        self._observing = False
        self._handles = []
        from torch.nn.utils import parametrize

        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre(i)))
            self._handles.append(layer.register_forward_hook(self._post(i, layer)))
            parametrize.register_parametrization(layer, "weight", _PerChannelFakeQuant(self._switch, weight_levels))

    @property
    def enabled(self) -> bool:
        return self._switch.on

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self._switch.on = on

    def _observe(self, key: tuple[int, str], x: torch.Tensor) -> None:
        lo, hi = float(x.min()), float(x.max())
        r = self.ranges.setdefault(key, [lo, hi])
        r[0], r[1] = min(r[0], lo), max(r[1], hi)

    def _act(self, key: tuple[int, str], x: torch.Tensor) -> torch.Tensor:
        if self._observing:
            self._observe(key, x)
            return x
        if not self.enabled or key not in self.ranges:
            return x
        return fake_quant_uint8(x, *self.ranges[key])

    def _pre(self, i: int) -> Callable:
        def hook(module, args):
            return (self._act((i, "in"), args[0]), *args[1:])
        return hook

    def _post(self, i: int, layer: nn.Module) -> Callable:
        bounds = self.clamp.get(layer)

        def hook(module, args, output):
            if bounds is not None and (self.enabled or self._observing):
                output = torch.clamp(output, *bounds)  # the fused activation; the ReLU after it is then a no-op
            return self._act((i, "out"), output)
        return hook

    def calibrate(self, views: torch.Tensor, batch_size: int = 32) -> None:
        """Measure every activation range afresh on `views` with the float model (no rounding anywhere)."""
        was_training = self.model.training
        self.ranges.clear()
        self._observing = True
        try:
            self.model.eval()
            with torch.no_grad(), self.rounding(False):
                for chunk in views.split(batch_size):
                    self.model(chunk)
        finally:
            self._observing = False
            self.model.train(was_training)

    @contextmanager
    def rounding(self, on: bool):
        previous, self.enabled = self.enabled, on
        try:
            yield self
        finally:
            self.enabled = previous

    def remove(self) -> None:
        from torch.nn.utils import parametrize

        for h in self._handles:
            h.remove()
        for layer in self.layers:
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        self._handles.clear()


class _Switch:
    """Whether the rounding is on; shared by a simulation's hooks and weight parametrizations."""

    def __init__(self) -> None:
        self.on = True


class _PerChannelFakeQuant(nn.Module):
    """Parametrization: the forward pass sees the per-channel int8 weight; the gradient passes to the float one."""

    def __init__(self, switch: _Switch, levels: int = 127) -> None:
        super().__init__()
        self.switch, self.levels = switch, levels

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.switch.on:
            return weight
        return weight + (round_per_channel(weight.detach(), self.levels) - weight).detach()
