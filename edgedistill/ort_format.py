"""ORT format (.ort) for ONNX Runtime Mobile: the model plus the operator list a reduced (minimal) build needs."""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from edgedistill.errors import ExportError


@dataclass
class OrtFormatModel:
    """An .ort model and its reduced-operator configuration file."""

    model: Path
    operators_config: Path


def fix_input_shapes(onnx_path: Path, dims: dict[str, int], out_path: Path) -> Path:
    """Write a copy of the graph whose named dimensions (e.g. {'batch': 1, 'sequence': 128}) are fixed."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    model = onnx.load(str(onnx_path))
    for name, size in dims.items():
        make_dim_param_fixed(model.graph, name, size)
    fix_output_shapes(model)
    onnx.save(model, str(out_path))
    return out_path


def convert_to_ort(onnx_path: Path, out_dir: Path) -> OrtFormatModel:
    """Convert an ONNX model to ORT format with fixed (build-time) optimizations; also write required_operators.config."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        shutil.copyfile(onnx_path, src)
        logging.disable(logging.WARNING)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the converter prints progress lines
                convert_onnx_models_to_ort(src, output_dir=Path(tmp) / "ort", optimization_styles=[OptimizationStyle.Fixed])
        except Exception as e:  # the converter raises plain exceptions for unsupported graphs
            raise ExportError(f"ORT-format conversion failed: {str(e).splitlines()[0]}",
                              hint="this operator set may not be supported by ORT Mobile") from None
        finally:
            logging.disable(logging.NOTSET)
        ort_files = sorted((Path(tmp) / "ort").glob("*.ort"))
        configs = sorted((Path(tmp) / "ort").glob("*.config"))
        if not ort_files or not configs:
            raise ExportError("ORT-format conversion produced no .ort model", hint="report this model")
        model = shutil.copyfile(ort_files[0], out_dir / "model.ort")
        config = shutil.copyfile(configs[0], out_dir / "required_operators.config")
    return OrtFormatModel(Path(model), Path(config))
