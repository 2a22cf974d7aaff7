"""Weight-only 4/8-bit quantization of MatMul (and embedding Gather) weights with onnxruntime's MatMulNBitsQuantizer."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

from edgedistill.quantize import excluded_nodes, register_recipe
from edgedistill.quantize.configs import WeightOnlyConfig


def _quantize_pass(model: onnx.ModelProto, bits: int, config: WeightOnlyConfig, ops: tuple[str, ...],
                   exclude: list[str], include: list[str] | None):
    """Return the quantizer's model after one pass at `bits` over the `ops` nodes not in `exclude`."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    # Gather quantizes along the embedding axis (1): one block of `block_size` per row, what GatherBlockQuantized reads
    axes = (("MatMul", 0), ("Gather", 1))
    algo = DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=config.symmetric,
                                        accuracy_level=config.accuracy_level or None, quant_format=QuantFormat.QOperator,
                                        op_types_to_quantize=ops, quant_axes=axes, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=config.block_size, is_symmetric=config.symmetric,
                                     accuracy_level=config.accuracy_level or None, nodes_to_exclude=exclude,
                                     nodes_to_include=include, op_types_to_quantize=ops, quant_axes=axes,
                                     algo_config=algo)
    with np.errstate(invalid="ignore", divide="ignore"):  # all-zero blocks have scale 0: quantized to 0 anyway
        quantizer.process()
    return quantizer.model


def _hqq_pass(model: onnx.ModelProto, config: WeightOnlyConfig, exclude: list[str]):
    """Return the quantizer's model after a 4-bit HQQ pass over the MatMul nodes not in `exclude`."""
    import warnings

    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    algo = HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=4, axis=1, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=algo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.from_numpy on a read-only initializer: the quantizer only reads it
        quantizer.process()
    return quantizer.model


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite each Gemm with a constant weight (alpha = beta = 1, transA = 0) as MatMul + Add, in place, and return
    how many: GPT-2's Conv1D layers export as Gemm, which MatMulNBits cannot take, so its layers stayed fp32."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        w_name = f"{node.input[1]}_matmul"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=f"{node.name}_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_Add"))
        count += 1
    if count:
        model.graph.ClearField("node")
        model.graph.node.extend(nodes)
        used = {i for n in model.graph.node for i in n.input}
        keep = [t for t in model.graph.initializer if t.name in used]
        model.graph.ClearField("initializer")
        model.graph.initializer.extend(keep)
    return count


@register_recipe(WeightOnlyConfig)
def quantize_weight_only(model_path: Path, config: WeightOnlyConfig, out_path: Path, calibration=()) -> Path:
    model = onnx.load(str(model_path))
    gemm_to_matmul(model)
    exclude = excluded_nodes(model_path, config.exclude)
    logging.disable(logging.WARNING)  # the quantizer logs every node, through a handler of its own
    try:
        int8 = [n for n in excluded_nodes(model_path, config.int8_nodes) if n not in exclude]
        int8 = [n.name for n in model.graph.node if n.name in set(int8) and n.op_type == "MatMul"]
        if int8 and config.bits == 4:  # mixed: these at 8 bits first; the rest are still MatMul for the 4-bit pass
            # (the quantizer's nodes_to_include adds to its op types rather than restricting them: exclude the rest)
            others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in set(int8)]
            model = _quantize_pass(model, 8, config, ("MatMul",), exclude + others, None).model
        embeddings = config.quantize_embeddings and config.bits == 4
        if config.algorithm == "hqq" and config.bits == 4:
            result = _hqq_pass(model, config, exclude)
            if embeddings:  # onnxruntime's HQQ does not quantize Gather: the table gets rtn at the same block size
                result = _quantize_pass(result.model, 4, config, ("Gather",), exclude, None)
        else:
            result = _quantize_pass(model, config.bits, config, ("MatMul", "Gather") if embeddings else ("MatMul",),
                                    exclude, None)
    finally:
        logging.disable(logging.NOTSET)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result.save_model_to_file(str(out_path), use_external_data_format=False)
    return out_path
