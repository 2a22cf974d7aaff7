"""Causal LM on the CPU: the teacher (transformers fp32, its own KV cache) vs the peer path (the teacher exported by
Optimum with its KV cache and quantized int4 by onnxruntime's MatMulNBitsQuantizer, block 32, symmetric, accuracy
level 4, embeddings fp32: what a user gets without distillation) vs our artifact, measured in one run by the harness
(edgedistill.bench.lm): the same held-out prompt and threads, interleaved.

    python benchmarks/lm_cpu.py --artifact build/lm/x86-64-avx512 [OTHER_ARTIFACT ...] [--threads 2] [--json lm.json]

Prints ratios: decode tokens/s vs the teacher and the peer, prefill, perplexity vs the teacher's, size vs the
teacher's fp32 weights, peak RSS of a fresh process per model.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edgedistill.bench.lm import run_lm_bench  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, nargs="+", required=True, help="one or more artifacts of one teacher")
    ap.add_argument("--teacher", default=None, help="default: the manifest's teacher")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--windows", type=int, default=32, help="held-out windows scored for perplexity")
    ap.add_argument("--min-time", type=float, default=20.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = run_lm_bench(args.artifact, args.teacher, args.threads, args.prompt_tokens, args.new_tokens,
                          args.windows, args.min_time)
    rows = {r.role: r for r in result.results}
    teacher, peer = rows["teacher"], rows["peer"]
    table = Table(title=f"{result.teacher['name']} → {', '.join(map(str, args.artifact))}: batch 1, {args.threads} threads, "
                        f"{args.prompt_tokens}-token held-out prompt, {args.new_tokens} greedy tokens, "
                        f"{result.data['num_windows']} held-out windows")
    for col in ("model", "prefill ms", "decode tok/s", "× teacher", "× peer", "perplexity", "× teacher's",
                "top-1 vs teacher", "size MB", "% teacher fp32", "peak RSS MB"):
        table.add_column(col)
    for r in result.results:
        tps = r.accuracy["decode_tokens_per_s"]
        ppl = r.accuracy["perplexity"]
        table.add_row(r.name, f"{r.latency[0].p50_ms:.1f}", f"{tps:.1f}",
                      f"{tps / teacher.accuracy['decode_tokens_per_s']:.2f}", f"{tps / peer.accuracy['decode_tokens_per_s']:.2f}",
                      f"{ppl:.2f}", f"{ppl / teacher.accuracy['perplexity']:.3f}",
                      f"{r.accuracy.get('top1_agreement', 1.0):.4f}", f"{r.model_size_mb:.1f}",
                      f"{r.model_size_mb / teacher.model_size_mb:.1%}",
                      "—" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}")
    Console(width=170).print(table)
    if args.json:
        args.json.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
