"""SkipLayerNormalization vs Add + LayerNormalization on onnxruntime's CPU, measured in one interleaved run.

onnxruntime's transformer fusions turn each residual Add and the LayerNormalization after it into one
SkipLayerNormalization; its CPU kernel is slower than the two it replaces, so the CPU profiles split it back
(edgedistill/optimize.py, ort_format.py). This prints the evidence:

Part 1, the kernels alone on a BERT-sized activation (batch x 128 x 384, fp32).
Part 2, whole graphs: MiniLM (the teacher, 6 layers) and a 3-layer student derived from it (untrained: latency does
not depend on the weights' values), exported, fused with SkipLayerNormalization kept or split, dynamic int8 as the
x86 profiles quantize, at batch 1 and 8 x 128. Columns: p50 of each, the paired ratio of block medians (fused / split:
above 1 means splitting is faster), and each graph's mean cosine to the torch module on 200 held-out texts (dynamic
int8 rounds the two a little differently: which one lands closer is chance).

    python benchmarks/layernorm_cpu.py [--threads 2] [--min-time 4]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from edgedistill.bench.timer import measure_interleaved, paired_ratio
from edgedistill.data import BUILTIN_VARIED, builtin_texts
from edgedistill.export import export_onnx
from edgedistill.families.text_encoder_stages import derive_student
from edgedistill.optimize import optimize_graph
from edgedistill.quantize import quantize
from edgedistill.quantize.configs import DynamicInt8Config
from edgedistill.runtimes.ort_cpu import cpu_session
from edgedistill.teachers import load_teacher

SEQ, HIDDEN = 128, 384


def kernel_graphs(batch: int) -> dict[str, bytes]:
    """The two ways of computing LayerNorm(x + skip + bias): onnxruntime's fused kernel, and Add -> Add -> LayerNorm."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), n) for n in ("gamma", "beta", "bias")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, SEQ, HIDDEN]) for n in ("x", "skip")]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graphs = {
        "SkipLayerNormalization": [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"],
                                                    ["y"], domain="com.microsoft", epsilon=1e-12)],
        "Add, Add, LayerNormalization": [helper.make_node("Add", ["x", "skip"], ["s"]),
                                         helper.make_node("Add", ["s", "bias"], ["t"]),
                                         helper.make_node("LayerNormalization", ["t", "gamma", "beta"], ["y"], axis=-1,
                                                          epsilon=1e-12)],
    }
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return {name: helper.make_model(helper.make_graph(nodes, "g", io, out, inits), opset_imports=opsets).SerializeToString()
            for name, nodes in graphs.items()}


def session(model, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    # the split graph must stay split here, whatever the session-time fusions would match
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"], disabled_optimizers=["SkipLayerNormFusion"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=4.0, help="seconds of interleaved timing per row")
    args = ap.parse_args()
    console = Console(width=160)

    t1 = Table(title=f"Part 1: the kernels alone, batch x {SEQ} x {HIDDEN} fp32, {args.threads} threads, interleaved")
    for c in ("batch", "SkipLayerNormalization p50 µs", "Add, Add, LayerNormalization p50 µs", "fused / split", "max |diff|"):
        t1.add_column(c, justify="right")
    rng = np.random.default_rng(1)
    for batch in (1, 8):
        sessions = {name: session(g, args.threads) for name, g in kernel_graphs(batch).items()}
        inputs = [{"x": rng.standard_normal((batch, SEQ, HIDDEN)).astype(np.float32),
                   "skip": rng.standard_normal((batch, SEQ, HIDDEN)).astype(np.float32)} for _ in range(4)]
        outs = [s.run(None, inputs[0])[0] for s in sessions.values()]
        stats = measure_interleaved({n: (lambda f, s=s: s.run(None, f), inputs) for n, s in sessions.items()},
                                    min_time_s=args.min_time)
        fused, split = (stats[n] for n in sessions)
        t1.add_row(str(batch), f"{fused.p50_ms * 1e3:.1f}", f"{split.p50_ms * 1e3:.1f}",
                   f"{paired_ratio(fused.block_p50_ms, split.block_p50_ms):.2f}×", f"{np.abs(outs[0] - outs[1]).max():.1e}")
    console.print(t1)

    teacher = load_teacher("minilm")
    tok, names = teacher.tokenizer, teacher.family.input_names(teacher.tokenizer)
    texts = builtin_texts(BUILTIN_VARIED, 24200)[24000:]  # never in the default compile's transfer set
    enc = tok(texts, padding=True, truncation=True, max_length=SEQ, return_tensors="np")
    held_out = {k: enc[k].astype(np.int64) for k in names}
    t2 = Table(title=f"Part 2: whole graphs, dynamic int8 (per-channel), seq {SEQ}, {args.threads} threads, interleaved")
    for c in ("model", "batch", "fused p50 ms", "split p50 ms", "fused / split", "cosine to torch: fused / split"):
        t2.add_column(c, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        student, _ = derive_student(teacher, 3)
        for label, module, layers in (("MiniLM-L6 (teacher)", teacher.module, teacher.config.num_hidden_layers),
                                      ("3-layer student", student, 3)):
            exported = export_onnx(module, teacher.family, names, 17, work / f"{layers}.onnx").path
            graphs = {}
            for kept in (True, False):
                opt = optimize_graph(exported, teacher.family, module.model.config, "transformer-fusion",
                                     work / f"{layers}-{kept}.opt.onnx", fuse_embeddings=False, fuse_skip_layer_norm=kept)
                graphs[kept] = quantize(opt.path, DynamicInt8Config(per_channel=True), work / f"{layers}-{kept}.q.onnx")
                ops = {n.op_type for n in onnx.load(str(graphs[kept])).graph.node}
                assert ("SkipLayerNormalization" in ops) == kept, "the fused graph fuses, the split one does not"
            fused_s, split_s = (cpu_session(graphs[k], args.threads) for k in (True, False))
            with torch.inference_mode():
                ref = module.eval()(**{k: torch.from_numpy(v) for k, v in held_out.items()}).numpy()

            def cosine(s: ort.InferenceSession) -> float:
                out = np.concatenate([s.run(None, {k: v[i:i + 50] for k, v in held_out.items()})[0]
                                      for i in range(0, len(texts), 50)])
                return float(np.mean(np.sum(out * ref, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))))

            cos = f"{cosine(fused_s):.4f} / {cosine(split_s):.4f}"
            for batch in (1, 8):
                batches = []
                for r in range(8):
                    e = tok(texts[r * batch:(r + 1) * batch], padding="max_length", truncation=True, max_length=SEQ,
                            return_tensors="np")
                    batches.append({k: e[k].astype(np.int64) for k in names})
                stats = measure_interleaved({"fused": (lambda f: fused_s.run(None, f), batches),
                                             "split": (lambda f: split_s.run(None, f), batches)}, min_time_s=args.min_time)
                t2.add_row(label, str(batch), f"{stats['fused'].p50_ms:.2f}", f"{stats['split'].p50_ms:.2f}",
                           f"{paired_ratio(stats['fused'].block_p50_ms, stats['split'].block_p50_ms):.2f}×", cos)
    console.print(t2)
    console.print(f"onnxruntime {ort.__version__}; a ratio above 1 means the split graph is faster.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
