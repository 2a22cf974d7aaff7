"""The runtimes `bench` can measure, by name. Each adapter says whether it can run here, and loads a model."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class OrtRuntime:
    """onnxruntime with one execution provider, on the artifact's file with the given suffix."""

    name: str
    provider: str
    model_suffix: str = ".onnx"

    def model_file(self, artifact_dir: Path, manifest_files: list[str]) -> Path | None:
        files = sorted(f for f in manifest_files if f.endswith(self.model_suffix))
        return artifact_dir / files[0] if files else None

    def unavailable_reason(self) -> str | None:
        import onnxruntime as ort

        if self.provider not in ort.get_available_providers():
            prefix = "no CUDA device: " if self.provider != "CPUExecutionProvider" else ""
            return f"{prefix}{self.provider} is not in this onnxruntime build (available: {', '.join(ort.get_available_providers())})"
        return None

    def load(self, model_path: Path, threads: int) -> tuple[Runner, dict[str, Any]]:
        """Return a callable running the model's first output, and the session settings to record."""
        import onnxruntime as ort

        from edgedistill.runtimes.ort_cpu import cpu_session, gpu_runner

        if self.provider != "CPUExecutionProvider":  # inputs bound on the device: the timing is the GPU's work
            gpu_run, session = gpu_runner(model_path, self.provider)
            dims = session.get_inputs()[0].shape[:2]
            return gpu_run, {"provider": self.provider, "io_binding": True, "onnxruntime": ort.__version__,
                             "fixed_input_shape": [d if isinstance(d, int) else None for d in dims]}
        session = cpu_session(model_path, threads, self.provider)
        opts = session.get_session_options()
        names = {i.name for i in session.get_inputs()}
        dims = session.get_inputs()[0].shape[:2]
        settings = {"provider": self.provider, "intra_op_threads": threads, "inter_op_threads": 1,
                    "graph_optimization": "ORT_ENABLE_ALL", "cpu_mem_arena": opts.enable_cpu_mem_arena,
                    "mem_pattern": opts.enable_mem_pattern, "intra_op_spinning": False, "onnxruntime": ort.__version__,
                    "fixed_input_shape": [d if isinstance(d, int) else None for d in dims]}

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]

        return run, settings


@dataclass(frozen=True)
class ExecutorchRuntime:
    """ExecuTorch's Python runtime on the artifact's .pte (XNNPACK kernels, as on a phone)."""

    name: str = "executorch"
    model_suffix: str = ".pte"

    def model_file(self, artifact_dir: Path, manifest_files: list[str]) -> Path | None:
        files = sorted(f for f in manifest_files if f.endswith(self.model_suffix))
        return artifact_dir / files[0] if files else None

    def unavailable_reason(self) -> str | None:
        try:
            import executorch.runtime  # noqa: F401
        except ImportError:
            return "the executorch package is not installed"
        return None

    def load(self, model_path: Path, threads: int) -> tuple[Runner, dict[str, Any]]:
        import executorch

        from edgedistill.backends.executorch import load_pte_method, pte_runner

        method = load_pte_method(model_path)
        fixed = list(method.metadata.input_tensor_meta(0).sizes())[:2]
        run = pte_runner(method)

        return run, {"runtime": "executorch", "executorch": getattr(executorch, "__version__", "unknown"),
                     "delegate": "XNNPACK", "threads": "runtime default", "fixed_input_shape": fixed}


from edgedistill.runtimes.ort_web import OrtWebRuntime  # noqa: E402

RUNTIMES: dict[str, OrtRuntime | ExecutorchRuntime | OrtWebRuntime] = {
    "executorch": ExecutorchRuntime(),
    "ort-cpu": OrtRuntime("ort-cpu", "CPUExecutionProvider"),
    "ort-mobile": OrtRuntime("ort-mobile", "CPUExecutionProvider", model_suffix=".ort"),
    "ort-cuda": OrtRuntime("ort-cuda", "CUDAExecutionProvider"),
    "ort-tensorrt": OrtRuntime("ort-tensorrt", "TensorrtExecutionProvider"),
    # onnxruntime-web in headless Chromium (runtimes/ort_web.py): WebAssembly, and WebGPU where an adapter exists
    "ort-web": OrtWebRuntime("ort-web", "wasm"),
    "ort-webgpu": OrtWebRuntime("ort-webgpu", "webgpu"),
}


def native_runtime(target: dict[str, Any]) -> str:
    """Return the RUNTIMES name that runs an artifact as its target does (from the manifest's `target` record):
    the .pte in ExecuTorch, the .ort in onnxruntime's mobile format, a GPU artifact on its provider, a browser
    artifact in Chromium."""
    runtime, provider = target.get("runtime"), target.get("execution_provider")
    if runtime == "executorch":
        return "executorch"
    if runtime == "onnxruntime-web":
        return "ort-webgpu" if provider == "webgpu" else "ort-web"
    if target.get("model_format") == "ort":
        return "ort-mobile"
    return next((name for name, rt in RUNTIMES.items() if isinstance(rt, OrtRuntime) and rt.model_suffix == ".onnx"
                 and rt.provider == provider), "ort-cpu")
