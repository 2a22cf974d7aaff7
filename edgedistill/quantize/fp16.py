"""Float16 conversion with onnxruntime's transformer tooling, keeping range-sensitive operators in float32."""
from __future__ import annotations

import logging
from pathlib import Path

import onnx

from edgedistill.quantize import register_recipe
from edgedistill.quantize.configs import Fp16Config


@register_recipe(Fp16Config)
def convert_fp16(model_path: Path, config: Fp16Config, out_path: Path, calibration=()) -> Path:
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(model_path)))
    logging.disable(logging.WARNING)  # the converter warns about every value it leaves in fp32
    try:
        model.convert_float_to_float16(keep_io_types=config.keep_io_types, op_block_list=config.keep_fp32_ops)
    finally:
        logging.disable(logging.NOTSET)
    model.save_model_to_file(str(out_path))
    return out_path
