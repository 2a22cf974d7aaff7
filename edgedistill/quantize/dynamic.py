"""Dynamic int8 with onnxruntime's quantizer."""
from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from edgedistill.quantize import excluded_nodes, register_recipe
from edgedistill.quantize.configs import DynamicInt8Config
from edgedistill.quantize.int4_rows import token_table_gathers


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
    if four_bit:
        from edgedistill.quantize.configs import WeightOnlyConfig
        from edgedistill.quantize.weight_only import _quantize_pass

        # 4-bit tables are INT4 tensors, which need opset 21; onnxruntime's quantizer only relabels the opset (its
        # own warning: "may not be a valid model" — ReduceL2's axes attribute became an input at 18), so convert
        from onnx import version_converter

        model = onnx.load(str(out_path))
        if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 21:
            model = version_converter.convert_version(model, 21)
        others = [n.name for n in model.graph.node if n.op_type == "Gather" and n.name not in set(four_bit)]
        cfg = WeightOnlyConfig(bits=4, block_size=config.embedding_block_size, symmetric=True, accuracy_level=0)
        logging.disable(logging.WARNING)  # the 4-bit quantizer logs every node through a handler of its own
        try:
            result = _quantize_pass(model, 4, cfg, ("Gather",), exclude + others, None)
        finally:
            logging.disable(logging.NOTSET)
        result.save_model_to_file(str(out_path), use_external_data_format=False)
    return out_path
