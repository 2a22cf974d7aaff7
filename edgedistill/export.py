"""torch -> ONNX export of the student with its head, checked numerically against torch before anything else runs.

Exporter choice (measured on the MiniLM student, see README "Recipe evidence"): torch's TorchScript-based exporter
(`dynamo=False`) and optimum's exporter both give graphs in which onnxruntime fuses Attention and
EmbedLayerNormalization; the graph from torch 2.13's default dynamo exporter only gets BiasGelu/SkipLayerNorm fused
and runs slower. We export our own head module (pooling + normalization or logits), which optimum's exporter does
not take, so we use the TorchScript exporter.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from edgedistill.errors import ExportError
from edgedistill.families.text_encoder import EncoderWithHead, TextEncoderFamily
from edgedistill.runtimes.ort_cpu import cpu_session

OUTPUT_NAMES = {"feature-extraction": "sentence_embedding", "text-classification": "logits"}
EXPORT_ATOL = 1e-4


@dataclass
class OnnxModel:
    """An ONNX file with the names of its inputs and output and how far it is from the torch module."""

    path: Path
    input_names: list[str]
    output_name: str
    opset: int
    max_abs_diff: float


def export_onnx(module: EncoderWithHead, family: TextEncoderFamily, input_names: list[str], opset: int,
                out_path: Path) -> OnnxModel:
    """Export `module` with dynamic batch and sequence axes; raise ExportError if ONNX and torch disagree."""
    module = module.eval()
    vocab = int(module.model.config.vocab_size)
    example = family.dummy_inputs(input_names, batch=2, sequence=16, vocab_size=vocab)
    output_name = OUTPUT_NAMES[module.task]
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    axes[output_name] = {0: "batch"}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module, tuple(example.values()), str(out_path), input_names=input_names,
                          output_names=[output_name], dynamic_axes=axes, opset_version=opset, dynamo=False,
                          do_constant_folding=True)
    onnx.checker.check_model(str(out_path), full_check=True)
    # check at a shape other than the traced one, so a baked-in shape fails here and not on the device
    check = family.dummy_inputs(input_names, batch=3, sequence=23, vocab_size=vocab)
    diff = max_abs_diff_vs_torch(module, out_path, check)
    if not diff <= EXPORT_ATOL * 10:
        raise ExportError(f"the exported ONNX graph differs from the torch student by {diff:.2e} (limit {EXPORT_ATOL * 10:.0e})",
                          hint="report this model to the edgedistill developers")
    return OnnxModel(out_path, input_names, output_name, opset, diff)


def max_abs_diff_vs_torch(module: torch.nn.Module, onnx_path: Path, inputs: dict[str, torch.Tensor]) -> float:
    """Return max |onnxruntime(onnx_path) - module| on `inputs`."""
    with torch.no_grad():
        expected = module(**inputs).numpy()
    got = cpu_session(onnx_path, threads=1).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    return float(np.max(np.abs(got - expected)))
