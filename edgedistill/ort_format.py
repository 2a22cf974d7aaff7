"""ORT format (.ort) for ONNX Runtime Mobile: the model plus the operator list a reduced (minimal) build needs."""
from __future__ import annotations

import contextlib
import io
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


# onnxruntime's converter (tools.convert_onnx_models_to_ort) with one change: SkipLayerNormFusion is off, since
# onnxruntime's CPU kernel of SkipLayerNormalization is slower than the Add and LayerNormalization it replaces
# (README: "SkipLayerNormalization on the CPU"); NchwcTransformer is off as the converter turns it off for any
# platform but amd64 (its layouts are x86-only).
DISABLED_OPTIMIZERS = ["NchwcTransformer", "SkipLayerNormFusion"]


def convert_to_ort(onnx_path: Path, out_dir: Path) -> OrtFormatModel:
    """Convert an ONNX model to ORT format with fixed (build-time) optimizations at onnxruntime's converter's level
    ('all', less DISABLED_OPTIMIZERS); also write required_operators.config."""
    import onnxruntime as ort
    from onnxruntime.tools.ort_format_model import create_config_from_models

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ort_file = Path(tmp) / "model.ort"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(ort_file)
        opts.add_session_config_entry("session.save_model_format", "ORT")
        opts.add_session_config_entry("session.qdqisint8allowed", "0")  # the converter's default platform
        opts.log_severity_level = 3
        try:
            ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=DISABLED_OPTIMIZERS)
            with contextlib.redirect_stdout(io.StringIO()):
                create_config_from_models([ort_file], Path(tmp) / "required_operators.config", False)
        except Exception as e:  # onnxruntime raises plain exceptions for unsupported graphs
            raise ExportError(f"ORT-format conversion failed: {str(e).splitlines()[0]}",
                              hint="this operator set may not be supported by ORT Mobile") from None
        if not ort_file.is_file():
            raise ExportError("ORT-format conversion produced no .ort model", hint="report this model")
        model = shutil.copyfile(ort_file, out_dir / "model.ort")
        config = shutil.copyfile(Path(tmp) / "required_operators.config", out_dir / "required_operators.config")
    return OrtFormatModel(Path(model), Path(config))
