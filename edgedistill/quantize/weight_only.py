"""Weight-only 4/8-bit quantization of MatMul (and embedding Gather) weights with onnxruntime's MatMulNBitsQuantizer."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

from edgedistill.quantize import excluded_nodes, register_recipe
from edgedistill.quantize.configs import WeightOnlyConfig


@register_recipe(WeightOnlyConfig)
def quantize_weight_only(model_path: Path, config: WeightOnlyConfig, out_path: Path, calibration=()) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    ops = ("MatMul", "Gather") if config.quantize_embeddings else ("MatMul",)
    # Gather quantizes along the embedding axis (1): one block of `block_size` per row, what GatherBlockQuantized reads
    algo = DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=config.symmetric,
                                        accuracy_level=config.accuracy_level or None, quant_format=QuantFormat.QOperator,
                                        op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)),
                                        bits=config.bits)
    model = onnx.load(str(model_path))
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)  # the quantizer logs every node at INFO
    quantizer = MatMulNBitsQuantizer(model, bits=config.bits, block_size=config.block_size,
                                     is_symmetric=config.symmetric, accuracy_level=config.accuracy_level or None,
                                     nodes_to_exclude=excluded_nodes(model_path, config.exclude),
                                     op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)),
                                     algo_config=algo)
    try:
        with np.errstate(invalid="ignore", divide="ignore"):  # all-zero blocks have scale 0: quantized to 0 anyway
            quantizer.process()
    finally:
        logging.getLogger().setLevel(previous)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quantizer.model.save_model_to_file(str(out_path), use_external_data_format=False)
    return out_path
