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
                   fuse_embeddings: bool = True) -> OptimizedModel:
    """Return the graph with onnxruntime's transformer fusions applied (mode 'transformer-fusion') or a copy ('none').
    fuse_embeddings=False leaves the embedding lookups and their LayerNorm unfused (EmbedLayerNormalization takes
    whole float or uint8 tables, so 4-bit tables need the plain Gathers)."""
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
    model.save_model_to_file(str(out_path))
    return OptimizedModel(out_path, fused)
