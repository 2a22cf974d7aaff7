"""onnxruntime sessions: the CPU execution provider, and GPU providers (with IO binding) where the build has them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgedistill.runtimes import predict_with


def cpu_session(model_path: Path, threads: int, provider: str = "CPUExecutionProvider",
                disabled_optimizers: list[str] | None = None) -> ort.InferenceSession:
    """Return a session with all graph optimizations (less `disabled_optimizers`), `threads` intra-op threads (one
    inter-op thread), on `provider` (the CPU by default)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # no busy-waiting between runs: a spinning intra-op pool steals the cores from whatever runs next in this
    # process (the teacher, interleaved call by call when timing): measured here, a 2-thread torch teacher went from
    # 24 ms to 90 ms beside spinning sessions. Deployments may turn spinning back on for back-to-back calls.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_path), opts, providers=[provider], disabled_optimizers=disabled_optimizers)


def provider_available(provider: str) -> bool:
    return provider in ort.get_available_providers()


def provider_unusable(model_path: Path, provider: str) -> str | None:
    """Return why `provider` cannot run the model here (None if it can). onnxruntime-gpu lists its GPU providers
    even without a device, cuDNN or TensorRT, so a session is tried."""
    if not provider_available(provider):
        return f"no CUDA device: {provider} is not in this onnxruntime build"
    try:
        gpu_runner(model_path, provider)
    except Exception as e:  # noqa: BLE001  any failure to start means: not runnable here
        return f"{provider} could not start here ({str(e).splitlines()[0][:200]})"
    return None


def gpu_runner(model_path: Path, provider: str):
    """Return (run, session) for a GPU provider. Inputs are copied to the device once per distinct array (the
    benchmark's rotating batches) and bound with IO binding, the output is bound on the device and copied back, so a
    timed call is the device's compute plus one small device-to-host copy."""
    providers: list = [provider]
    if provider == "TensorrtExecutionProvider":
        # int8 must be switched on for TensorRT to build QDQ engines (TensorRT 8 refuses them otherwise); engines
        # are cached beside the model, so repeated sessions (search trials, validation shapes) do not rebuild them
        cache = Path(model_path).parent / ".trt-engines"
        cache.mkdir(exist_ok=True)
        providers = [("TensorrtExecutionProvider", {"trt_int8_enable": True, "trt_engine_cache_enable": True,
                                                    "trt_engine_cache_path": str(cache)}), "CUDAExecutionProvider"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), opts, providers=providers)
    if session.get_providers()[0] != provider:
        raise RuntimeError(f"{provider} could not start (the session fell back to {session.get_providers()[0]})")
    on_device: dict[int, tuple[np.ndarray, ort.OrtValue]] = {}
    output = session.get_outputs()[0].name
    names = {i.name for i in session.get_inputs()}

    def bound(array: np.ndarray) -> ort.OrtValue:
        hit = on_device.get(id(array))
        if hit is None or hit[0] is not array:
            if len(on_device) >= 64:  # one-off batches (validation) must not pile up on the device
                on_device.clear()
            hit = on_device[id(array)] = (array, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        return hit[1]

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        binding = session.io_binding()
        for name, array in feeds.items():
            if name in names:
                binding.bind_ortvalue_input(name, bound(array))
        binding.bind_output(output, "cuda", 0)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    return run, session


def predict(session: ort.InferenceSession, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Return the session's first output for `texts`, one float32 row per text; fixed-shape graphs get their shape."""
    dims = session.get_inputs()[0].shape[:2]
    fixed = (dims[0], dims[1]) if all(isinstance(d, int) for d in dims) else None
    return predict_with(lambda feeds: session.run(None, feeds)[0], tokenizer, texts,
                        [i.name for i in session.get_inputs()], max_length, fixed, batch_size)
