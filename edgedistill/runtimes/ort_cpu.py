"""onnxruntime on the CPU execution provider."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgedistill.progress import track
from edgedistill.runtimes import iter_batches, num_batches


def cpu_session(model_path: Path, threads: int) -> ort.InferenceSession:
    """Return a CPU session with all graph optimizations and `threads` intra-op threads (one inter-op thread)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def predict(session: ort.InferenceSession, tokenizer, texts: list[str], max_length: int,
            batch_size: int = 64, description: str | None = None) -> np.ndarray:
    """Return the session's first output for `texts`, one float32 row per text, in the order given.

    A graph with fixed input shapes is fed batches of exactly its shape.
    """
    input_names = [i.name for i in session.get_inputs()]
    batch_dim, seq_dim = session.get_inputs()[0].shape[:2]
    fixed = isinstance(seq_dim, int)
    if fixed:
        max_length, batch_size = seq_dim, batch_dim if isinstance(batch_dim, int) else batch_size
    out = None
    batches = iter_batches(tokenizer, texts, input_names, max_length, batch_size, fixed=fixed)
    if description:
        batches = track(batches, num_batches(len(texts), batch_size), description)
    for idx, inputs in batches:
        y = session.run(None, inputs)[0][: len(idx)].astype(np.float32)
        if out is None:
            out = np.empty((len(texts), y.shape[-1]), dtype=np.float32)
        out[idx] = y
    return out
