"""onnxruntime on the CPU execution provider."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgedistill.runtimes import predict_with


def cpu_session(model_path: Path, threads: int, provider: str = "CPUExecutionProvider") -> ort.InferenceSession:
    """Return a session with all graph optimizations, `threads` intra-op threads (one inter-op thread), on `provider`
    (the CPU by default)."""
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
    return ort.InferenceSession(str(model_path), opts, providers=[provider])


def predict(session: ort.InferenceSession, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Return the session's first output for `texts`, one float32 row per text; fixed-shape graphs get their shape."""
    dims = session.get_inputs()[0].shape[:2]
    fixed = (dims[0], dims[1]) if all(isinstance(d, int) for d in dims) else None
    return predict_with(lambda feeds: session.run(None, feeds)[0], tokenizer, texts,
                        [i.name for i in session.get_inputs()], max_length, fixed, batch_size)
