"""Quantization-aware distillation: the student trains through the rounding its target will apply.

Each weight the target quantizes is replaced, in the forward pass, by its block-wise rounded value (round to nearest,
symmetric, the scale of each block being its largest-magnitude weight over -2^(bits-1): bit for bit what
onnxruntime's MatMulNBits quantizer computes, checked in tests), with a straight-through gradient to the float
weight. After training the float weights are kept; the target's quantizer then lands on the grid the student
learned.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize


@dataclass(frozen=True)
class FakeQuantSpec:
    """Block-wise symmetric weight rounding: `bits` per weight, one scale per `block_size` weights along the input
    dimension (the reduction axis of the MatMul, the hidden axis of an embedding table)."""

    bits: int = 4
    block_size: int = 32
    embeddings: bool = True  # the token-embedding table is rounded too (its artifact stores it at `bits`)


def block_round(weight: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """Return `weight` (out, in) rounded block-wise along `in` as MatMulNBits' symmetric rtn does, in float."""
    out_features, in_features = weight.shape
    pad = (-in_features) % block_size
    w = nn.functional.pad(weight, (0, pad)) if pad else weight
    blocks = w.reshape(out_features, -1, block_size)
    qmax = 2 ** (bits - 1)
    peak = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))  # signed: that weight lands exactly on -qmax
    scale = peak / -qmax
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    rounded = (torch.clamp(torch.round(blocks / safe), -qmax, qmax - 1) * scale).reshape(out_features, -1)
    return rounded[:, :in_features] if pad else rounded


class _StraightThrough(torch.autograd.Function):
    """The rounded weight forward, the gradient unchanged to the float weight backward."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
        return rounded

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _BlockFakeQuant(nn.Module):
    """Parametrization: the forward pass sees the rounded weight; the gradient passes straight to the float one.

    The rounding is kept until the float weight changes (its version counter: an optimizer step or a loaded state
    bumps it), so a frozen table (the token embeddings, by default) is rounded once, not at every forward pass, and
    modules that share one weight (tied embeddings and LM head) share one instance and one rounding. Measured on a
    20-layer SmolLM2 student, batch 8 x 64, 2 cores, medians: a training step 4.29 -> 2.84 s (2.77 s without the
    rounding), an evaluation forward pass 1.65 -> 0.83 s (0.75 s)."""

    def __init__(self, bits: int, block_size: int, transposed: bool) -> None:
        super().__init__()
        self.bits, self.block_size, self.transposed = bits, block_size, transposed
        self._kept: tuple[tuple, torch.Tensor] | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        stamp = (weight.data_ptr(), weight._version, weight.device, weight.shape)
        if self._kept is None or self._kept[0] != stamp:
            w = weight.detach()
            q = block_round(w.t() if self.transposed else w, self.bits, self.block_size)
            self._kept = (stamp, q.t() if self.transposed else q)
        return _StraightThrough.apply(weight, self._kept[1])

    def __getstate__(self):  # copies (the loop's best state) round again on their first pass, not share this one
        return {**super().__getstate__(), "_kept": None}


def quantized_weights(model: nn.Module, spec: FakeQuantSpec) -> list[tuple[nn.Module, bool]]:
    """Return the modules whose `weight` the target quantizes, and whether it is stored (in, out): Linear layers (the
    LM head included), GPT-2's Conv1D layers, and the token embeddings when `spec.embeddings`."""
    from transformers.pytorch_utils import Conv1D

    found = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            found.append((module, False))
        elif isinstance(module, Conv1D):
            found.append((module, True))
    embeddings = model.get_input_embeddings() if spec.embeddings else None
    if embeddings is not None:
        found.append((embeddings, False))  # (vocab, hidden): blocks along hidden, as GatherBlockQuantized stores it
    return found


@contextmanager
def fake_quantized(model: nn.Module, spec: FakeQuantSpec | None):
    """Train `model` inside this block with its target-quantized weights rounded in every forward pass; on exit the
    rounding is removed and the float weights stay (tied weights stay tied: both modules hold one parameter)."""
    if spec is None:
        yield model
        return
    modules = quantized_weights(model, spec)
    shared: dict[tuple[int, bool], _BlockFakeQuant] = {}  # one rounding per tied weight
    for module, transposed in modules:
        rounding = shared.setdefault((id(module.weight), transposed),
                                     _BlockFakeQuant(spec.bits, spec.block_size, transposed))
        parametrize.register_parametrization(module, "weight", rounding)
    try:
        yield model
    finally:
        for module, _ in modules:
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the float weights of a model trained inside fake_quantized (e.g. the loop's copy of its best state)
    under the plain module's names. Copies of a parametrized module share its generated class, so they are read,
    not un-parametrized in place."""
    suffix = ".parametrizations.weight.original"
    return {(k[: -len(suffix)] + ".weight" if k.endswith(suffix) else k): v for k, v in model.state_dict().items()}
