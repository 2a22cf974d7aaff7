"""Causal LM on the CPU: the teacher (transformers fp32, its own KV cache) vs the peer path (the teacher exported by
Optimum with its KV cache and quantized int4 by onnxruntime's MatMulNBitsQuantizer, block 32, symmetric, accuracy
level 4, embeddings left fp32 -- what a user gets without distillation) vs our artifact.

One run, the same prompts, the same threads, interleaved: prefill of a 128-token held-out prompt, a 64-token greedy
generation (decode tokens/s = 64 / (generation - prefill)), peak RSS of a fresh process per model, file size, and
held-out perplexity against the teacher on the windows the artifact carries (which compile never trained on).

    python benchmarks/lm_cpu.py --artifact build/lm/x86-64-avx512 [--threads 2] [--json lm.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edgedistill.artifact import verify_files  # noqa: E402
from edgedistill.bench.timer import measure_interleaved, paired_ratio  # noqa: E402
from edgedistill.runtimes.ort_lm import OrtCausalLM  # noqa: E402
from edgedistill.validate import LMMetricsAccumulator  # noqa: E402

PEER_NOTE = "Optimum text-generation-with-past + MatMulNBitsQuantizer int4 (block 32, symmetric, accuracy 4)"


def peer_model(teacher, out_dir: Path) -> Path:
    """Export the teacher the peer way (cached in out_dir) and return the int4 model's path."""
    from edgedistill.export_lm import export_causal_lm
    from edgedistill.quantize import quantize
    from edgedistill.quantize.configs import WeightOnlyConfig

    final = out_dir / "peer-int4.onnx"
    if final.is_file():
        return final
    windows = np.arange(64, dtype=np.int64).reshape(2, 32) + 100
    exported = export_causal_lm(teacher.module, teacher.tokenizer, out_dir / "export", 21, windows)
    return quantize(exported.model, WeightOnlyConfig(bits=4, block_size=32, symmetric=True, accuracy_level=4,
                                                     quantize_embeddings=False), final)


def child(kind: str, path: str, threads: int, prompt_tokens: int, new_tokens: int) -> None:
    """Load one model in this fresh process, generate once, print its peak RSS (VmHWM) in MB."""
    torch.set_num_threads(threads)
    prompt = list(range(100, 100 + prompt_tokens))
    if kind == "torch":
        from edgedistill.export_lm import torch_greedy
        from edgedistill.teachers import load_teacher

        torch_greedy(load_teacher(path).module, prompt, new_tokens)
    else:
        list(OrtCausalLM(Path(path), threads).generate(prompt, new_tokens))
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(float(line.split()[1]) / 1024)


def peak_rss_mb(kind: str, path: str, args) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", kind, path, "--threads", str(args.threads),
                          "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)],
                         capture_output=True, text=True, env={**os.environ, "EDGEDISTILL_QUIET": "1"}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def perplexity(logits_of, windows: np.ndarray, labels: np.ndarray) -> dict:
    acc = LMMetricsAccumulator()
    for start in range(0, len(windows), 4):
        w = windows[start : start + 4].astype(np.int64)
        acc.add(logits_of(w), w, labels[start : start + 4])
    return acc.metrics()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path)
    ap.add_argument("--teacher", default=None, help="default: the manifest's teacher")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--windows", type=int, default=32, help="held-out windows scored for perplexity")
    ap.add_argument("--peer-dir", type=Path, default=Path("build/peer-lm"))
    ap.add_argument("--min-time", type=float, default=20.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.threads, args.prompt_tokens, args.new_tokens)
        return 0
    from edgedistill.export_lm import torch_greedy
    from edgedistill.teachers import load_teacher

    console = Console(width=150)
    manifest = verify_files(args.artifact)
    teacher_name = args.teacher or manifest.teacher["name"]
    teacher = load_teacher(teacher_name)
    peer_path = peer_model(teacher, args.peer_dir)
    artifact_path = args.artifact / manifest.model["file"]
    torch.set_num_threads(args.threads)
    ours, peer = OrtCausalLM(artifact_path, args.threads), OrtCausalLM(peer_path, args.threads)
    windows = np.load(args.artifact / "validation-windows.npy")[: args.windows]
    labels = np.load(args.artifact / "validation-teacher.npy")[: args.windows]
    stream = windows.reshape(-1)
    prompt = stream[: args.prompt_tokens].tolist()
    n = args.new_tokens

    def gen_ort(lm):
        return lambda _: list(lm.generate(prompt, n))

    with torch.inference_mode():
        t_prompt = torch.tensor([prompt])
        candidates = {
            "teacher generate": (lambda _: torch_greedy(teacher.module, prompt, n), [0]),
            "peer generate": (gen_ort(peer), [0]), "artifact generate": (gen_ort(ours), [0]),
            "teacher prefill": (lambda _: teacher.module(input_ids=t_prompt, use_cache=True), [0]),
            "peer prefill": (lambda _: peer.forward(np.asarray([prompt])), [0]),
            "artifact prefill": (lambda _: ours.forward(np.asarray([prompt])), [0]),
        }
        t0 = time.perf_counter()
        stats = measure_interleaved(candidates, warmup=1, min_blocks=3, min_time_s=args.min_time, block_s=0.0, settle=0)
        timing_s = time.perf_counter() - t0
        fid = {"teacher": {"perplexity": float(np.exp(-np.nanmean(labels["target"][:, :-1].astype(np.float64))))},
               "peer": perplexity(peer.logits, windows, labels), "artifact": perplexity(ours.logits, windows, labels)}
    teacher_fp32_mb = manifest.sizes["teacher_weights_mb"]
    sizes = {"teacher": teacher_fp32_mb, "peer": peer_path.stat().st_size / 1e6, "artifact": artifact_path.stat().st_size / 1e6}
    rss = {"teacher": peak_rss_mb("torch", teacher_name, args), "peer": peak_rss_mb("ort", str(peer_path), args),
           "artifact": peak_rss_mb("ort", str(artifact_path), args)}
    rows = {}
    for who in ("teacher", "peer", "artifact"):
        gen, pre = stats[f"{who} generate"], stats[f"{who} prefill"]
        rows[who] = {"prefill_ms": pre.p50_ms, "generate_ms": gen.p50_ms,
                     "decode_tokens_per_s": n / max((gen.p50_ms - pre.p50_ms) / 1e3, 1e-9),
                     "perplexity": fid[who]["perplexity"], "size_mb": sizes[who], "peak_rss_mb": rss[who]}
    base = rows["teacher"]
    for who, r in rows.items():
        r["perplexity_ratio"] = r["perplexity"] / base["perplexity"]
        r["decode_vs_teacher"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["decode_vs_peer"] = r["decode_tokens_per_s"] / rows["peer"]["decode_tokens_per_s"]
        r["generate_speedup_vs_teacher"] = 1.0 / paired_ratio(stats[f"{who} generate"].block_p50_ms,
                                                              stats["teacher generate"].block_p50_ms)
        r["size_vs_teacher_fp32"] = r["size_mb"] / teacher_fp32_mb
    table = Table(title=f"{teacher_name} → {args.artifact} ({manifest.student['num_layers']} of "
                        f"{manifest.teacher['num_layers']} layers), batch 1, {args.threads} threads, {args.prompt_tokens}-token "
                        f"prompt, {n} new tokens, {len(windows)} held-out windows; timed {timing_s:.0f} s interleaved")
    for col in ("model", "prefill ms", "decode tok/s", "× teacher", "× peer", "perplexity", "× teacher ppl",
                "size MB", "% teacher fp32", "peak RSS MB"):
        table.add_column(col)
    labels_ = {"teacher": "teacher, torch fp32", "peer": "peer: " + PEER_NOTE, "artifact": "artifact (distilled + " +
               manifest.quantization["profile"]["recipe"] + ")"}
    for who, r in rows.items():
        table.add_row(labels_[who], f"{r['prefill_ms']:.1f}", f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_vs_teacher']:.2f}",
                      f"{r['decode_vs_peer']:.2f}", f"{r['perplexity']:.2f}", f"{r['perplexity_ratio']:.3f}",
                      f"{r['size_mb']:.1f}", f"{r['size_vs_teacher_fp32']:.1%}", f"{r['peak_rss_mb']:.0f}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                                         "new_tokens": n, "windows": len(windows)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
