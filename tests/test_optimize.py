"""Graph optimization: onnxruntime's transformer fusions, with SkipLayerNormalization split back into Add and
LayerNormalization for the CPU (its CPU kernel is slower than the two)."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort

from edgedistill.export import export_onnx
from edgedistill.optimize import optimize_graph
from edgedistill.runtimes.ort_cpu import cpu_session
from edgedistill.teachers import load_teacher


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_skip_layer_norm_is_split_for_the_cpu_and_stays_split_in_a_default_session(tiny_encoder, tmp_path):
    teacher = load_teacher(str(tiny_encoder))
    names = teacher.family.input_names(teacher.tokenizer)
    exported = export_onnx(teacher.module, teacher.family, names, 17, tmp_path / "m.onnx")
    config = teacher.module.model.config
    fused = optimize_graph(exported.path, teacher.family, config, "transformer-fusion", tmp_path / "fused.onnx")
    split = optimize_graph(exported.path, teacher.family, config, "transformer-fusion", tmp_path / "split.onnx",
                           fuse_skip_layer_norm=False)
    layers = config.num_hidden_layers
    assert _ops(fused.path)["SkipLayerNormalization"] == 2 * layers  # after attention and after the FFN
    assert fused.fused_ops.get("Attention") == split.fused_ops.get("Attention") == layers  # the other fusions stay
    assert _ops(split.path)["SkipLayerNormalization"] == 0 and "SkipLayerNormalization" not in split.fused_ops
    assert _ops(split.path)["LayerNormalization"] == _ops(fused.path)["LayerNormalization"] + 2 * layers
    # a user's session (all optimizations, onnxruntime's default) does not fuse the pairs back
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "session.onnx")
    ort.InferenceSession(str(split.path), opts, providers=["CPUExecutionProvider"])
    assert _ops(tmp_path / "session.onnx")["SkipLayerNormalization"] == 0
    # and it computes what the fused graph computes
    enc = teacher.tokenizer(["a short sentence", "another, somewhat longer sentence to pad the first"], padding=True,
                            return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in names}
    a = cpu_session(fused.path, 1).run(None, feeds)[0]
    b = cpu_session(split.path, 1).run(None, feeds)[0]
    np.testing.assert_allclose(b, a, atol=1e-5)
