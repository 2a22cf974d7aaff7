"""MiniLM on the CPU: teacher (torch fp32) vs Optimum's dynamic-int8 export of the teacher (the peer path) vs our artifact.

Everything is measured in one run, on the same held-out inputs and thread counts, so the ratios hold on a noisy
machine. Held-out texts come from the built-in English set *after* the part `compile` trains and validates on.

    python benchmarks/minilm_cpu.py --artifact build/x86-64-avx512 [OTHER_ARTIFACT ...] [--json results.json]

Several artifacts (e.g. one revision's beside another's) are timed in the same interleaved run; the goals are
checked on the first.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

from edgedistill.artifact import verify_files
from edgedistill.bench.timer import measure_interleaved
from edgedistill.data import BUILTIN_SETS, BUILTIN_VARIED, builtin_texts, out_of_domain_texts
from edgedistill.runtimes.ort_cpu import cpu_session
from edgedistill.teachers import load_teacher
from edgedistill.teachers.hf import checkpoint_sha256

SEQ = 128
SHAPES = [(1, 1), (1, 2), (8, 1), (8, 2)]  # (batch, threads)


def mean_pool_normalize(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def optimum_int8(teacher_path: Path, workdir: Path, per_channel: bool) -> Path:
    """Export the teacher with optimum and quantize it with optimum's avx512_vnni dynamic recipe; return the file."""
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    export_dir = workdir / "optimum-fp32"
    if not (export_dir / "model.onnx").exists():
        ORTModelForFeatureExtraction.from_pretrained(teacher_path, export=True).save_pretrained(export_dir)
    quantizer = ORTQuantizer.from_pretrained(export_dir)
    cfg = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=per_channel)
    out = workdir / f"optimum-int8-{'pc' if per_channel else 'pt'}"
    quantizer.quantize(cfg, out)
    return out / "model_quantized.onnx"


def ort_embed(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    outs = {o.name: v for o, v in zip(session.get_outputs(), session.run(None, feeds))}
    if "sentence_embedding" in outs:
        return outs["sentence_embedding"]
    return mean_pool_normalize(outs["last_hidden_state"] if "last_hidden_state" in outs else outs["token_embeddings"],
                               feeds["attention_mask"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, nargs="+", default=[Path("build/x86-64-avx512")],
                    help="artifact directories, timed in the same run; goals are checked on the first")
    ap.add_argument("--held-out", type=int, default=1000, help="held-out texts for the cosine column")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--min-time", type=float, default=4.0, help="seconds of timing per shape, all models interleaved")
    args = ap.parse_args()
    console = Console(width=160)
    manifests = [verify_files(a) for a in args.artifact]
    manifest = manifests[0]
    teacher = load_teacher("minilm")
    for a, m in zip(args.artifact, manifests):
        if m.teacher["sha256"] != checkpoint_sha256(teacher.path):
            sys.exit(f"{a} was not compiled from the minilm teacher")
    # held out: the compile's built-in set after the part it used (another data file: the varied set from its start)
    source = manifest.data["source"] if manifest.data["source"] in BUILTIN_SETS else BUILTIN_VARIED
    used = manifest.data["num_texts"] if manifest.data["source"] == source else 0
    texts = builtin_texts(source, used + args.held_out)[used:]
    tok = teacher.tokenizer
    names = teacher.family.input_names(tok)

    # fidelity inputs: held-out texts, dynamic padding; latency inputs: 8 rotating batches padded to SEQ tokens
    def encode(batch_texts):
        enc = tok(batch_texts, padding=True, truncation=True, max_length=SEQ, return_tensors="np")
        return {k: enc[k].astype(np.int64) for k in names}

    def teacher_embed(feeds):
        with torch.inference_mode():
            return np.concatenate([teacher.module(**{k: torch.from_numpy(v[i:i + 64]) for k, v in feeds.items()}).numpy()
                                   for i in range(0, len(next(iter(feeds.values()))), 64)])

    feeds_all = encode(texts)
    teacher_emb = teacher_embed(feeds_all)
    # out of domain: Python's reference documentation, long paragraphs the compile never trained on (data.py)
    feeds_ood = encode(out_of_domain_texts())
    teacher_ood = teacher_embed(feeds_ood)
    lat_batches = {}
    for b, _ in SHAPES:
        lat_batches[b] = []
        for r in range(8):
            e = tok(texts[r * b:(r + 1) * b], padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
            lat_batches[b].append({k: e[k].astype(np.int64) for k in names})

    with tempfile.TemporaryDirectory() as work:
        candidates = {
            "optimum int8, docs recipe (per-tensor)": optimum_int8(teacher.path, Path(work), per_channel=False),
            "optimum int8, per-channel": optimum_int8(teacher.path, Path(work), per_channel=True),
        }
        ours_names = []
        for a in args.artifact:
            name = f"edgedistill {a.parent.name}/{a.name}" if len(args.artifact) > 1 else f"edgedistill {a.name}"
            candidates[name] = a / "model.onnx"
            ours_names.append(name)
        teacher_mb = sum(f.stat().st_size for f in teacher.path.glob("*.safetensors")) / 1e6
        rows = [{"name": "teacher, torch fp32", "size_mb": teacher_mb, "cosine_mean": 1.0, "cosine_min": 1.0,
                 "ood_cosine_mean": 1.0}]

        def cosine(sess, feeds, reference):
            n = len(reference)
            emb = np.concatenate([ort_embed(sess, {k: v[i:i + 64] for k, v in feeds.items()}) for i in range(0, n, 64)])
            return np.sum(emb * reference, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1))

        for name, path in candidates.items():
            sess = cpu_session(path, 2)
            cos, ood = cosine(sess, feeds_all, teacher_emb), cosine(sess, feeds_ood, teacher_ood)
            rows.append({"name": name, "size_mb": path.stat().st_size / 1e6, "cosine_mean": float(cos.mean()),
                         "cosine_min": float(cos.min()), "ood_cosine_mean": float(ood.mean())})
        for b, t in SHAPES:
            torch.set_num_threads(t)
            tb = [{k: torch.from_numpy(v) for k, v in x.items()} for x in lat_batches[b]]
            sessions = {name: cpu_session(path, t) for name, path in candidates.items()}
            runs = {rows[0]["name"]: (torch.inference_mode()(lambda x: teacher.module(**x)), tb)}
            runs.update({name: (partial(sess.run, None), lat_batches[b]) for name, sess in sessions.items()})
            p50 = measure_interleaved(runs, min_time_s=args.min_time)
            for row in rows:
                row[f"b{b}_t{t}_ms"] = p50[row["name"]].p50_ms

    base = rows[0]
    table = Table(title=f"MiniLM-L6 on this CPU: median latency (ms) at seq {SEQ}, {len(texts)} held-out texts for cosine; "
                        f"ratio = teacher / row; "
                        f"all models interleaved call by call")
    table.add_column("model", no_wrap=True)
    for b, t in SHAPES:
        table.add_column(f"b{b} t{t}", justify="right")
    table.add_column("speedup b1 t2", justify="right")
    table.add_column("size MB (vs teacher)", justify="right")
    table.add_column("cosine mean / min", justify="right")
    table.add_column(f"out of domain ({len(teacher_ood)})", justify="right")
    for r in rows:
        table.add_row(r["name"], *[f"{r[f'b{b}_t{t}_ms']:.2f} ({base[f'b{b}_t{t}_ms'] / r[f'b{b}_t{t}_ms']:.1f}x)" for b, t in SHAPES],
                      f"{base['b1_t2_ms'] / r['b1_t2_ms']:.2f}x", f"{r['size_mb']:.1f} ({r['size_mb'] / base['size_mb']:.0%})",
                      f"{r['cosine_mean']:.4f} / {r['cosine_min']:.4f}", f"{r['ood_cosine_mean']:.4f}")
    console.print(table)
    ours = next(r for r in rows if r["name"] == ours_names[0])
    goals = [("speedup vs teacher at b1 t2 >= 4x", base["b1_t2_ms"] / ours["b1_t2_ms"] >= 4),
             ("size <= 25% of teacher", ours["size_mb"] / base["size_mb"] <= 0.25),
             ("held-out cosine to teacher >= 0.90", ours["cosine_mean"] >= 0.90),
             ("out-of-domain cosine to teacher >= 0.90", ours["ood_cosine_mean"] >= 0.90)]
    for goal, ok in goals:
        console.print(f"{'[green]met[/]' if ok else '[red]MISSED[/]'}  {goal}")
    if args.json:
        args.json.write_text(json.dumps({"seq": SEQ, "cpu_count": os.cpu_count(), "rows": rows}, indent=2))
    return 0 if all(ok for _, ok in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
