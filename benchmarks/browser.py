"""The browser recipe, chosen in the browser: one MiniLM student compiled with each onnxruntime recipe for
onnxruntime-web, every artifact validated in headless Chromium, then benched in one run beside the native x86 artifact
(ort-web and ort-cpu, the teacher in torch, the same held-out texts and threads).

Distillation runs once (cached); each variant is its own compile so that a recipe onnxruntime-web cannot load is
reported, not fatal. Budgets are lowered to --min-cosine: a short benchmark distillation does not reach the real 0.90.

    python benchmarks/browser.py [--max-texts 1500] [--epochs 2] [--student-layers 3] [--out build/browser]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from edgedistill.bench.results import markdown_table
from edgedistill.bench.runner import BenchSettings, run_bench
from edgedistill.distill.loop import DistillConfig
from edgedistill.errors import EdgeDistillError
from edgedistill.pipeline import CompileOptions, compile
from edgedistill.targets import resolve_target

# name suffix -> (optimization, quantization): what is compared in Chromium
VARIANTS = {
    "fp32": ("transformer-fusion", {"recipe": "fp32"}),
    "fp32-unfused": ("none", {"recipe": "fp32"}),
    "int8": ("transformer-fusion", {"recipe": "dynamic-int8", "per_channel": True}),
    "int8-unfused": ("none", {"recipe": "dynamic-int8", "per_channel": True}),
    "int8-emb4": ("transformer-fusion", {"recipe": "dynamic-int8", "per_channel": True, "embedding_bits": 4}),
    "qdq-int8": ("none", {"recipe": "static-qdq-int8", "op_types": ["MatMul", "Gemm", "Gather"],
                          "weight_only": [r"layer\.\d+/output/dense/"], "search": False}),
    "fp16": ("transformer-fusion", {"recipe": "fp16"}),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-texts", type=int, default=1500)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--student-layers", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("build/browser"))
    ap.add_argument("--min-cosine", type=float, default=0.8)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--min-time", type=float, default=3.0)
    ap.add_argument("--reuse", action="store_true", help="bench artifacts already in --out instead of compiling them again")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    base = resolve_target("browser-wasm").model_dump(mode="json")
    native = resolve_target("x86-64-avx512").model_dump(mode="json")
    profiles = {}
    for suffix in args.variants.split(","):
        optimization, quantization = VARIANTS[suffix]
        profiles[f"browser-{suffix}"] = {**base, "name": f"browser-{suffix}", "optimization": optimization,
                                         "quantization": quantization}
    profiles["x86-64-avx512"] = native
    opts = CompileOptions(max_texts=args.max_texts, student_layers=args.student_layers,
                          distill=DistillConfig(epochs=args.epochs))
    console = Console(width=200)
    built, failed = [], {}
    for name, data in profiles.items():
        data["accuracy_budget"] = {**data["accuracy_budget"], "min_cosine": args.min_cosine}
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        if args.reuse and (args.out / name / "manifest.json").is_file():
            built.append(args.out / name)
            continue
        try:
            result = compile("minilm", None, [str(path)], args.out, opts)
        except EdgeDistillError as e:
            failed[name] = str(e).splitlines()[0]
            console.print(f"[red]{name}[/]: {failed[name]}")
            continue
        if result.targets[0].published:
            built.append(args.out / name)
        else:
            failed[name] = f"missed its budget ({result.targets[0].manifest.metrics['verdict']})"
    bench = run_bench(built, None, None, BenchSettings(runtimes=["ort-web", "ort-cpu"], batches=[1], sequence=128,
                                                       min_time_s=args.min_time, memory=False))
    table = Table(title=f"MiniLM student ({args.student_layers} layers, {args.max_texts} texts, {args.epochs} epochs): "
                        f"recipes in Chromium (ort-web) beside native onnxruntime, b1 x s128, {bench.settings['threads']} threads")
    for col in ("artifact", "runtime", "size MB", "p50 ms", "x teacher latency", "cosine to teacher", "ood cosine (compile)"):
        table.add_column(col)
    for r in bench.results:
        if r.status != "measured":
            table.add_row(r.name, r.runtime, "", "", "", f"not measured: {r.reason}", "")
            continue
        lat = r.latency[0]
        ratio = r.ratio_to_teacher.get(lat.key)
        ood = ""
        if r.artifact_dir:
            from edgedistill.artifact import read_manifest

            ood = f"{read_manifest(Path(r.artifact_dir)).metrics['values'].get('ood_cosine_mean', float('nan')):.4f}"
        table.add_row(r.name, r.runtime, f"{r.model_size_mb:.2f}", f"{lat.p50_ms:.2f}", f"{ratio:.3f}" if ratio else "1",
                      f"{r.accuracy.get('cosine_mean', 1.0):.4f}", ood)
    for name, why in failed.items():
        table.add_row(name, "ort-web", "", "", "", f"FAILED: {why}", "")
    console.print(table)
    (args.out / "browser-bench.md").write_text(markdown_table(bench), encoding="utf-8")
    (args.out / "browser-bench.json").write_text(bench.model_dump_json(indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
