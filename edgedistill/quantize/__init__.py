"""Quantization recipes, looked up by config type: `quantize(model_path, config, out_path)`.

Adding a recipe = a config class in configs.py plus a module here that registers its handler.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from pydantic import BaseModel

Feeds = dict[str, np.ndarray]
_HANDLERS: dict[type, Callable[..., Path]] = {}


def register_recipe(config_type: type):
    """Register the handler that applies configs of `config_type`."""
    def wrap(fn):
        _HANDLERS[config_type] = fn
        return fn

    return wrap


def quantize(model_path: Path, config: BaseModel, out_path: Path, calibration: Sequence[Feeds] = ()) -> Path:
    """Write `model_path` quantized per `config` to `out_path` and return it.

    `calibration` holds example inputs (real transfer-set text) for recipes that calibrate activation ranges.
    """
    return _HANDLERS[type(config)](model_path, config, out_path, calibration)


def excluded_nodes(model_path: Path, patterns: list[str]) -> list[str]:
    """Return the names of the graph's nodes that match any of the regexes. A node onnxruntime's optimizer fused
    (named 'X/MatMulAddFusion' after the node 'X' it grew from) matches where its original name does, so patterns
    written against the exported graph (as the accuracy search's are) still find it after quantization's
    pre-processing."""
    if not patterns:
        return []
    compiled = [re.compile(p) for p in patterns]
    graph = onnx.load(str(model_path), load_external_data=False).graph

    def names(node) -> tuple[str, ...]:
        base, _, last = node.name.rpartition("/")
        return (node.name, base) if base and last.endswith("Fusion") else (node.name,)

    return [n.name for n in graph.node if any(c.search(name) for c in compiled for name in names(n))]


from edgedistill.quantize import dynamic, fp16, fp32, static_qdq, weight_only  # noqa: E402,F401  (registers the handlers)
