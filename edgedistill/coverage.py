"""Operator coverage: can the target's execution provider run every node of the graph?

The CPU provider answers for itself (a session refuses a node it has no kernel for). GPU providers are not in this
onnxruntime build, so their operator tables ship with edgedistill (provider_ops.json, extracted from onnxruntime's
docs/OperatorKernels.md and onnx-tensorrt's docs/operators.md; its "sources" key names the commits) and the graph is
checked against them: every (domain, operator) must be listed, and a node computing in float16 needs a float16 kernel.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from edgedistill.errors import ProfileError

TABLE = Path(__file__).with_name("provider_ops.json")
_FLOAT16 = onnx.TensorProto.FLOAT16


@dataclass
class Coverage:
    """The result of checking a graph against a provider's operator table."""

    provider: str
    source: str
    ops: dict[str, int] = field(default_factory=dict)  # "domain:op" -> count of nodes
    unsupported: list[str] = field(default_factory=list)  # "domain:op" the provider has no kernel for
    no_fp16_kernel: list[str] = field(default_factory=list)  # "domain:op" computing in fp16 without an fp16 kernel

    @property
    def ok(self) -> bool:
        return not self.unsupported and not self.no_fp16_kernel

    def as_dict(self) -> dict:
        return {"provider": self.provider, "source": self.source, "ok": self.ok, "unsupported": self.unsupported,
                "no_fp16_kernel": self.no_fp16_kernel, "ops": self.ops}


@functools.cache
def provider_table() -> dict:
    return json.loads(TABLE.read_text(encoding="utf-8"))


def checked_providers() -> list[str]:
    return [k for k in provider_table() if k != "sources"]


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Return each tensor's element type: onnx shape inference for standard operators, and for contrib operators
    (which it cannot infer) the type of their first input (true of the fused transformer operators)."""
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001  a graph shape inference rejects is still checked by its explicit types
        pass
    g = model.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in [*g.input, *g.value_info, *g.output]:
        if v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for node in g.node:
        first = next((types[i] for i in node.input if i in types), None)
        for o in node.output:
            if o not in types and first is not None:
                types[o] = first
    return types


def check_coverage(model_path: Path, provider: str) -> Coverage:
    """Return which of the graph's operators `provider` lacks, by its table."""
    table = provider_table()
    if provider not in table:
        raise ProfileError(f"no operator table for {provider}", hint=f"checked providers: {', '.join(checked_providers())}")
    kernels = table[provider]
    model = onnx.load(str(model_path))
    types = _elem_types(model)
    cov = Coverage(provider, table["sources"][provider])
    for node in model.graph.node:
        if node.op_type == "Constant" and not node.domain:
            continue  # onnxruntime folds Constant nodes into initializers before any provider sees them
        domain = node.domain or "ai.onnx"
        key = f"{domain}:{node.op_type}"
        cov.ops[key] = cov.ops.get(key, 0) + 1
        kernel = kernels.get(domain, {}).get(node.op_type)
        if kernel is None:
            if key not in cov.unsupported:
                cov.unsupported.append(key)
        elif (any(types.get(i) == _FLOAT16 for i in node.input if i) and not kernel.get("float16", False)
              and key not in cov.no_fp16_kernel):
            cov.no_fp16_kernel.append(key)
    return cov


def require_coverage(model_path: Path, provider: str) -> Coverage:
    """Return the coverage, or raise ProfileError naming the operators the provider cannot run."""
    cov = check_coverage(model_path, provider)
    if not cov.ok:
        parts = []
        if cov.unsupported:
            parts.append(f"operators {', '.join(cov.unsupported)} have no {provider} kernel")
        if cov.no_fp16_kernel:
            parts.append(f"operators {', '.join(cov.no_fp16_kernel)} have no float16 kernel")
        raise ProfileError(f"the artifact cannot run on {provider}: {'; '.join(parts)}",
                           hint="change the profile's optimization or quantization (or keep those operators in fp32: "
                                "quantization.keep_fp32_ops)")
    return cov
