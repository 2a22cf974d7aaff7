"""The accuracy search on the real MiniLM student: a budget that the profile's plain recipe misses, met by searching.

For each profile: build it once with the search off (the plain recipe), then set the budget halfway between that
plain artifact's cosine to the teacher and the fp32 student's, and build again with the search on. The second build
must publish; its trials (calibration methods, per-channel, sensitivity probes, node groups kept in float) are
printed as the manifest records them. Distillation runs once for all builds.

    python benchmarks/search_case.py [--max-texts 6000] [--epochs 1] [--out build/search-case]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgedistill.distill.loop import DistillConfig
from edgedistill.families.text_encoder_stages import build_target, distill_student
from edgedistill.pipeline import CompileOptions
from edgedistill.targets import TargetProfile, resolve_target
from edgedistill.teachers import load_teacher


def variant(name: str, *, search: bool, min_cosine: float) -> TargetProfile:
    data = resolve_target(name).model_dump(mode="json")
    data["quantization"]["search"] = search
    data["accuracy_budget"]["min_cosine"] = min_cosine
    data["name"] = f"{name}-{'search' if search else 'plain'}"
    return TargetProfile.model_validate(data)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-texts", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--targets", nargs="+", default=["nvidia-tensorrt-int8", "arm64-mobile"])
    ap.add_argument("--out", type=Path, default=Path("build/search-case"))
    args = ap.parse_args()
    console = Console(width=170)
    opts = CompileOptions(max_texts=args.max_texts, max_length=128, distill=DistillConfig(epochs=args.epochs))
    teacher = load_teacher("minilm", None)
    data = teacher.family.load_data(teacher, None, opts)
    distilled = distill_student(teacher, data, 3, 128, opts)
    args.out.mkdir(parents=True, exist_ok=True)
    met = []
    for name in args.targets:
        with tempfile.TemporaryDirectory(dir=args.out) as work:
            (Path(work) / "plain").mkdir()
            (Path(work) / "search").mkdir()
            plain = build_target(distilled, variant(name, search=False, min_cosine=0.0), Path(work) / "plain", opts)
            values = plain.manifest.metrics["values"]
            fp32, plain_cos = values["torch_student_cosine_mean"], values["cosine_mean"]
            budget = round((plain_cos + fp32) / 2, 4)
            searched = build_target(distilled, variant(name, search=True, min_cosine=budget), Path(work) / "search",
                                    opts)
        v = searched.manifest.metrics["values"]
        table = Table(title=f"{name}: plain recipe {plain_cos:.4f}, fp32 student {fp32:.4f}, budget set to {budget}")
        for col in ("trial", "fidelity (search texts)", "meets budget", "size MB", "ms here"):
            table.add_column(col)
        for t in searched.manifest.quantization["trials"]:
            ms = "—" if t.get("latency_ms") is None else f"{t['latency_ms']:.2f}"
            table.add_row(t["description"], f"{t['fidelity']:.4f}", "yes" if t["passed"] else "no", f"{t['size_mb']:.1f}", ms)
        console.print(table)
        verdict = "met" if searched.passed and plain_cos < budget else "MISSED"
        console.print(f"{verdict}: {name} with the search: cosine {v['cosine_mean']:.4f} on "
                      f"{searched.manifest.data['num_validation']} held-out texts vs budget {budget} "
                      f"(plain {plain_cos:.4f}), {searched.manifest.sizes['model_mb']:.1f} MB "
                      f"vs plain {plain.manifest.sizes['model_mb']:.1f} MB\n")
        met.append(verdict == "met")
    return 0 if all(met) else 1


if __name__ == "__main__":
    sys.exit(main())
