"""Every built-in target from one compile of the real MiniLM teacher: size, latency here, fidelity vs the teacher.

Distillation runs once; each target is exported, quantized (with the accuracy search where its recipe has one),
validated and timed by its own backend. Latency of arm64 targets is measured on this host's CPU, not the device.

    python benchmarks/targets.py [--max-texts 6000] [--epochs 1] [--out build/targets]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from edgedistill.distill.loop import DistillConfig
from edgedistill.pipeline import CompileOptions, compile
from edgedistill.report import latency_cell
from edgedistill.targets import builtin_profiles, cpu_flags


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-texts", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("build/targets"))
    ap.add_argument("--min-cosine", type=float, default=None,
                    help="override every profile's budget (a short benchmark compile does not reach the real 0.90)")
    args = ap.parse_args()
    flags = cpu_flags()
    profiles = [p for p in builtin_profiles().values() if not p.cpu_flags or set(p.cpu_flags) <= flags]
    names = []
    for p in profiles:
        if args.min_cosine is not None:
            path = Path(tempfile.mkdtemp()) / f"{p.name}.yaml"
            data = p.model_dump(mode="json")
            data["accuracy_budget"]["min_cosine"] = args.min_cosine
            path.write_text(yaml.safe_dump(data))
            names.append(str(path))
        else:
            names.append(p.name)
    result = compile("minilm", None, names, args.out,
                     CompileOptions(max_texts=args.max_texts, max_length=128, distill=DistillConfig(epochs=args.epochs)))
    table = Table(title=f"MiniLM student ({args.max_texts} texts, {args.epochs} epoch) on every target this machine can build")
    for col in ("target", "runtime / format", "size MB (vs teacher)", "p50 ms here (speed-up)", "cosine to teacher",
                "fp32 student", "trials", "verdict"):
        table.add_column(col)
    by_name = {}
    for r in result.targets:
        m = r.manifest
        v = m.metrics["values"]
        by_name[r.profile.name] = v["cosine_mean"]
        table.add_row(r.profile.name, f"{m.target['runtime']} / {m.model['format']}",
                      f"{m.sizes['model_mb']:.1f} ({m.sizes['size_ratio']:.0%})",
                      latency_cell(m.latency),
                      f"{v['cosine_mean']:.4f}", f"{v['torch_student_cosine_mean']:.4f}",
                      str(len(m.quantization["trials"])), "pass" if r.published else "FAIL")
    console = Console(width=170)
    console.print(table)
    dynamic = next((by_name[n] for n in ("x86-64-avx512", "x86-64-avx2") if n in by_name), None)
    if dynamic is not None and "arm64-mobile" in by_name:
        gap = dynamic - by_name["arm64-mobile"]
        console.print(f"{'met' if gap <= 0.02 else 'MISSED'}: arm64-mobile static QDQ within 0.02 of dynamic int8 "
                      f"(gap {gap:+.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
