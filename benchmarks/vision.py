"""Image classifiers on the CPU, measured in one run: the teacher in torch fp32, the teacher exported to ONNX (fp32),
the peer path (the teacher exported and statically quantized by onnxruntime the plain way, no distillation: QDQ,
per-channel int8 weights, uint8 activations, min-max on 64 crops, op types Conv and Gemm), the same with our
quantization recipe but no distillation (Conv+ReLU6 fused), and our artifacts; the same held-out views and threads,
interleaved blocks.

    python benchmarks/vision.py --artifact build/vision/x86-64-avx512 [OTHER ...] [--threads 2] [--json vision.json]

Artifacts may be rejected ones kept with `compile --keep-rejected` (OUT/<target>.rejected/). Prints, per model:
batch-1 latency and batch-8 images/s with their ratios to the teacher in torch fp32 and to the peer (b1 × peer: the
ratio of the two medians against the same teacher blocks), top-1 / top-5
agreement and KL to the teacher on the artifact's held-out views (with top-1's 95% interval over the held-out photos
when the artifact carries validation-photos.npy), size and its share of the teacher's weights. The measurement is `edgedistill bench`'s (edgedistill/bench/vision.py);
this script prints it as the README's tables. --json writes the bench's result schema.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edgedistill.bench.vision import run_vision_bench  # noqa: E402
from edgedistill.errors import EdgeDistillError  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, nargs="+", required=True, help="vision artifacts of one teacher")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--min-time", type=float, default=6.0, help="seconds of interleaved timing per batch size and round")
    ap.add_argument("--rounds", type=int, default=1, help="timing rounds; a ratio is the median of the rounds'")
    ap.add_argument("--teacher", help="the teacher, when the manifest's cannot be found (default: the manifest's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    try:
        result = run_vision_bench(args.artifact, args.teacher, args.threads, [1, 8], args.min_time, args.rounds)
    except EdgeDistillError as e:
        sys.exit(f"error: {e.message}" + (f" (hint: {e.hint})" if e.hint else ""))
    teacher = result.results[0]
    teacher_mb = teacher.model_size_mb
    peer = next(r for r in result.results if r.name.startswith("peer:"))
    table = Table(title=f"{result.teacher['name']}: {result.data['num_views']} held-out views of {args.artifact[0].name}"
                        f", {result.settings['threads']} threads, interleaved; ratios = medians of paired block ratios")
    interval = any("top1_agreement_low95" in r.accuracy for r in result.results)
    for col in ("model", "b1 ms", "b1 × teacher", "b1 × peer", "b8 img/s", "b8 × teacher", "top-1",
                *(["top-1 95%"] if interval else []), "top-5", "KL", "MB", "% teacher"):
        table.add_column(col)
    for r in result.results:
        name = r.name if r.role != "artifact" else f"ours: {r.name}"
        if r.status != "measured":
            table.add_row(name, f"not measured: {r.reason}")
            continue
        lat = {x.batch: x for x in r.latency}
        ratio = {x.batch: r.ratio_to_teacher.get(x.key, 1.0) for x in r.latency}  # latency / teacher's
        peer_b1 = peer.ratio_to_teacher.get(lat[1].key) if 1 in lat else None
        f = r.accuracy or {"top1_agreement": 1.0, "top5_agreement": 1.0, "kl_teacher": 0.0}
        cell = lambda b, fn: fn() if b in lat else "—"  # noqa: E731  (a fixed-batch model has one)
        table.add_row(name, cell(1, lambda: f"{lat[1].p50_ms:.2f}"), cell(1, lambda: f"{1 / ratio[1]:.2f}"),
                      cell(1, lambda: f"{peer_b1 / ratio[1]:.2f}" if peer_b1 else "—"),
                      cell(8, lambda: f"{8000 / lat[8].p50_ms:.0f}"), cell(8, lambda: f"{1 / ratio[8]:.2f}"),
                      f"{f['top1_agreement']:.4f}",
                      *([f"{f.get('top1_agreement_low95', 1.0):.2f}–{f.get('top1_agreement_high95', 1.0):.2f}"] if interval else []),
                      f"{f['top5_agreement']:.4f}", f"{f['kl_teacher']:.4f}", f"{r.model_size_mb:.2f}",
                      f"{r.model_size_mb / teacher_mb:.1%}")
    Console(width=200).print(table)
    if args.json:
        args.json.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
