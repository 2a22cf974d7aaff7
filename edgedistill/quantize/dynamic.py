"""Dynamic int8 with onnxruntime's quantizer."""
from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from edgedistill.quantize import excluded_nodes, register_recipe
from edgedistill.quantize.configs import DynamicInt8Config
from edgedistill.quantize.int4_rows import pack_token_gathers, token_table_gathers


@register_recipe(DynamicInt8Config)
def quantize_dynamic_int8(model_path: Path, config: DynamicInt8Config, out_path: Path, calibration=()) -> Path:
    logging.getLogger("root").setLevel(logging.ERROR)  # the quantizer logs every skipped node at WARNING
    exclude = excluded_nodes(model_path, config.exclude)
    four_bit = token_table_gathers(onnx.load(str(model_path), load_external_data=False), exclude) \
        if config.embedding_bits == 4 else []
    quantize_dynamic(
        model_path, out_path,
        weight_type=QuantType.QInt8,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        op_types_to_quantize=config.op_types,
        nodes_to_exclude=exclude + four_bit,
        # fused contrib ops (Attention, SkipLayerNormalization...) have no type info for the quantizer's
        # shape inference; without a default it refuses to quantize their consumers
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    if four_bit:  # packed rows, unpacked after the lookup: see pack_token_gathers for why not GatherBlockQuantized
        pack_token_gathers(out_path, four_bit, config.embedding_block_size)
    return out_path
