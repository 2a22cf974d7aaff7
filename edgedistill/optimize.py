"""Graph optimization with onnxruntime's transformer fusions (Attention, EmbedLayerNormalization, SkipLayerNorm, Gelu)."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgedistill.families.text_encoder import TextEncoderFamily


@dataclass
class OptimizedModel:
    """The optimized graph and the count of each fused operator in it."""

    path: Path
    fused_ops: dict[str, int]


def optimize_graph(onnx_path: Path, family: TextEncoderFamily, config, mode: str, out_path: Path,
                   fuse_embeddings: bool = True, fuse_skip_layer_norm: bool = True) -> OptimizedModel:
    """Return the graph with onnxruntime's transformer fusions applied (mode 'transformer-fusion') or a copy ('none').
    fuse_embeddings=False leaves the embedding lookups and their LayerNorm unfused (EmbedLayerNormalization takes
    whole float or uint8 tables, so 4-bit tables need the plain Gathers). fuse_skip_layer_norm=False keeps each
    residual Add and its LayerNormalization apart: onnxruntime's CPU kernel of SkipLayerNormalization is slower than
    the two it replaces (README: "SkipLayerNormalization on the CPU")."""
    if mode == "none":
        shutil.copyfile(onnx_path, out_path)
        return OptimizedModel(out_path, {})
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(family.type.ort_model_type)
    options.enable_embed_layer_norm = fuse_embeddings
    # the fusion modules log under their bare module names (fusion_embedlayer, ...): silence warnings for the call
    logging.disable(logging.WARNING)
    try:
        model = optimize_model(str(onnx_path), model_type=family.type.ort_model_type, optimization_options=options,
                               num_heads=family.num_heads(config), hidden_size=family.hidden_size(config))
    finally:
        logging.disable(logging.NOTSET)
    fused = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    if not fuse_skip_layer_norm:
        n = split_skip_layer_norms(model.model)
        if n:
            fused.pop("SkipLayerNormalization", None)
            fused["LayerNormalization"] = fused.get("LayerNormalization", 0) + n
    model.save_model_to_file(str(out_path))
    return OptimizedModel(out_path, fused)


def split_skip_layer_norms(model) -> int:
    """Replace each SkipLayerNormalization (input, skip, gamma, beta[, bias]) whose only output is the normalized
    sum by Add(input, skip) -> Add(bias) -> LayerNormalization, in place; return how many were split. The Adds come
    in this order because onnxruntime's session-time SkipLayerNormFusion matches bias-then-skip and would fuse the
    pair straight back (tested: a default session of the artifact holds no SkipLayerNormalization)."""
    from onnx import helper

    nodes, n = [], 0
    for node in model.graph.node:
        outputs = [o for o in node.output if o]
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft" or outputs != [node.output[0]]:
            nodes.append(node)
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        x, skip, gamma = node.input[:3]
        beta = node.input[3] if len(node.input) > 3 else ""
        bias = node.input[4] if len(node.input) > 4 else ""
        total = f"{node.name}/skip_sum"
        nodes.append(helper.make_node("Add", [x, skip], [total], name=total))
        if bias:
            nodes.append(helper.make_node("Add", [total, bias], [total + "_bias"], name=total + "_bias"))
            total += "_bias"
        nodes.append(helper.make_node("LayerNormalization", [total, gamma] + ([beta] if beta else []), [node.output[0]],
                                      name=f"{node.name}/layer_norm", axis=-1, epsilon=eps))
        n += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return n
