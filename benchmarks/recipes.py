"""Recipe evidence on the real MiniLM teacher: which exporter, and which dynamic-int8 settings, measured in one run.

Part 1, exporters: the same torch module (encoder + mean pooling + normalize) exported by torch's TorchScript
exporter (dynamo=False), by torch's dynamo exporter, and by optimum (encoder only; pooling done in numpy), each then
run through onnxruntime's transformer fusions. Columns: fused operators, fp32 latency, max |diff| to torch.
Part 2, dynamic int8 on the fused TorchScript graph: per-tensor vs per-channel weights, with and without reduce_range.
Columns: cosine to the torch teacher on held-out text, latency, size.

    python benchmarks/recipes.py
"""
from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from edgedistill.bench.timer import measure
from edgedistill.data import BUILTIN_VARIED, builtin_texts
from edgedistill.export import export_onnx
from edgedistill.optimize import optimize_graph
from edgedistill.quantize import quantize
from edgedistill.quantize.configs import DynamicInt8Config
from edgedistill.runtimes.ort_cpu import cpu_session
from edgedistill.teachers import load_teacher

THREADS, SEQ = 2, 128


def cos_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    c = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(c.mean()), float(c.min())


def main() -> int:
    console = Console(width=160)
    teacher = load_teacher("minilm")
    tok, names = teacher.tokenizer, teacher.family.input_names(teacher.tokenizer)
    texts = builtin_texts(BUILTIN_VARIED, 25000)[24000:]  # never in the default compile's transfer set
    enc = tok(texts, padding=True, truncation=True, max_length=SEQ, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in names}
    with torch.inference_mode():
        ref = np.concatenate([teacher.module(**{k: torch.from_numpy(v[i:i + 100]) for k, v in feeds.items()}).numpy()
                              for i in range(0, len(texts), 100)])
    lat = []
    for r in range(8):
        e = tok(texts[r:r + 1], padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
        lat.append({k: e[k].astype(np.int64) for k in names})

    def run_all(path: Path, pool: bool = False) -> np.ndarray:
        sess = cpu_session(path, THREADS)
        outs = []
        for i in range(0, len(texts), 100):
            f = {k: v[i:i + 100] for k, v in feeds.items() if k in {x.name for x in sess.get_inputs()}}
            y = sess.run(None, f)[0]
            if pool:
                m = f["attention_mask"][..., None].astype(np.float32)
                y = (y * m).sum(1) / m.sum(1)
                y = y / np.linalg.norm(y, axis=1, keepdims=True)
            outs.append(y)
        return np.concatenate(outs)

    def latency(path: Path) -> float:
        sess = cpu_session(path, THREADS)
        keep = {x.name for x in sess.get_inputs()}
        return measure(lambda x: sess.run(None, {k: v for k, v in x.items() if k in keep}), lat).p50_ms

    work = Path(tempfile.mkdtemp())
    exports = {}
    exports["torch TorchScript (dynamo=False)"] = (export_onnx(teacher.module, teacher.family, names, 17, work / "ts.onnx").path, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example = tuple(teacher.family.dummy_inputs(names, 2, 16, teacher.config.vocab_size).values())
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        torch.onnx.export(teacher.module, example, str(work / "dynamo.onnx"), input_names=names,
                          output_names=["sentence_embedding"], dynamo=True, opset_version=18,
                          dynamic_shapes={n: {0: batch, 1: seq} for n in names})
    exports["torch dynamo (default)"] = (work / "dynamo.onnx", False)
    from optimum.exporters.onnx import main_export

    main_export(str(teacher.path), work / "optimum", task="feature-extraction", library_name="transformers")
    exports["optimum (encoder; pooling in numpy)"] = (work / "optimum" / "model.onnx", True)

    t1 = Table(title=f"Exporters, then onnxruntime transformer fusion: fp32, batch 1 x seq {SEQ}, {THREADS} threads")
    for c in ("exporter", "fused operators", "p50 ms", "max |diff| to torch"):
        t1.add_column(c)
    fused_paths = {}
    for name, (path, pool) in exports.items():
        opt = optimize_graph(path, teacher.family, teacher.config, "transformer-fusion", path.with_suffix(".opt.onnx"))
        fused_paths[name] = opt.path
        diff = float(np.max(np.abs(run_all(opt.path, pool) - ref)))
        t1.add_row(name, ", ".join(f"{k} {v}" for k, v in sorted(opt.fused_ops.items())) or "none",
                   f"{latency(opt.path):.2f}", f"{diff:.1e}")
    console.print(t1)

    t2 = Table(title=f"Dynamic int8 on the fused TorchScript graph: {len(texts)} held-out texts, batch 1 x seq {SEQ}, {THREADS} threads")
    for c in ("per_channel", "reduce_range", "cosine mean / min", "p50 ms", "size MB"):
        t2.add_column(c)
    fp32 = fused_paths["torch TorchScript (dynamo=False)"]
    t2.add_row("(fp32)", "", "%.4f / %.4f" % cos_stats(run_all(fp32), ref), f"{latency(fp32):.2f}", f"{fp32.stat().st_size / 1e6:.1f}")
    for pc in (False, True):
        for rr in (False, True):
            q = quantize(fp32, DynamicInt8Config(per_channel=pc, reduce_range=rr), work / f"q{pc:d}{rr:d}.onnx")
            t2.add_row(str(pc), str(rr), "%.4f / %.4f" % cos_stats(run_all(q), ref), f"{latency(q):.2f}", f"{q.stat().st_size / 1e6:.1f}")
    console.print(t2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
