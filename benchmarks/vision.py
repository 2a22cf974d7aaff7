"""Image classifiers on the CPU, measured in one run: the teacher in torch fp32, the teacher exported to ONNX (fp32),
the peer path (the teacher exported and statically quantized by onnxruntime the plain way, no distillation: QDQ,
per-channel int8 weights, uint8 activations, min-max on 64 crops, op types Conv and Gemm), the same with our
quantization recipe but no distillation (Conv+ReLU6 fused), and our artifacts; the same held-out views and threads,
interleaved blocks.

    python benchmarks/vision.py --artifact build/vision/x86-64-avx512 [OTHER ...] [--threads 2] [--json vision.json]

Artifacts may be rejected ones kept with `compile --keep-rejected` (OUT/<target>.rejected/). Prints, per model:
batch-1 latency and batch-8 images/s with their ratios to the teacher in torch fp32 and to the peer, top-1 / top-5
agreement and KL to the teacher on the artifact's held-out views (with top-1's 95% interval over the held-out photos
when the artifact carries validation-photos.npy), size and its share of the teacher's weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edgedistill.bench.timer import measure_interleaved, paired_ratio  # noqa: E402
from edgedistill.families.vision_build import export_vision, run_onnx  # noqa: E402
from edgedistill.families.vision_stages import INPUT, teacher_logits  # noqa: E402
from edgedistill.families.vision_validation import VAL_PHOTOS, agreement, agreement_interval  # noqa: E402
from edgedistill.images import load_image_set, make_views  # noqa: E402
from edgedistill.quantize import quantize  # noqa: E402
from edgedistill.quantize.configs import StaticQdqInt8Config  # noqa: E402
from edgedistill.runtimes.ort_cpu import cpu_session  # noqa: E402
from edgedistill.teachers.vision import load_vision_teacher  # noqa: E402


def peer_models(teacher, size: int, work: Path, calibration: np.ndarray) -> dict[str, Path]:
    """The teacher exported (fp32) and quantized without distillation: plainly, and with our recipe."""
    fp32, _ = export_vision(teacher.module, size, work / "teacher.onnx", 17)
    feeds = [{INPUT: v[None].astype(np.float32) / 255.0} for v in calibration]
    plain = quantize(fp32, StaticQdqInt8Config(op_types=["Conv", "Gemm"], calibration_texts=len(feeds), search=False),
                     work / "peer-int8.onnx", feeds)
    ours = quantize(fp32, StaticQdqInt8Config(op_types=["Conv", "Gemm", "Clip"], calibration_texts=len(feeds),
                                              search=False), work / "teacher-int8-fused.onnx", feeds)
    return {"teacher, onnxruntime fp32": fp32, "peer: teacher + plain onnxruntime int8": plain,
            "teacher + our int8 recipe (no distillation)": ours}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, nargs="+", required=True, help="vision artifacts of one teacher")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--min-time", type=float, default=6.0, help="seconds of interleaved timing per batch size")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    manifests = [json.loads((a / "manifest.json").read_text()) for a in args.artifact]
    names = {m["teacher"]["name"] for m in manifests}
    if len(names) != 1 or any(m["family"] != "vision" for m in manifests):
        sys.exit(f"error: pass vision artifacts of one teacher (got {sorted(names)})")
    teacher = load_vision_teacher(names.pop())
    size = manifests[0]["data"]["image_size"]
    views = np.load(args.artifact[0] / "validation-views.npy")
    photos_of = args.artifact[0] / VAL_PHOTOS  # which held-out photo each view is of: the interval's resampling unit
    groups = np.load(photos_of) if photos_of.is_file() else None
    reference = teacher_logits(teacher.module, views)
    photos = load_image_set(None, None)  # calibration crops for the peer: another seed than any compile's views
    calibration, _ = make_views(photos.images, max(1, 64 // len(photos)), size, 12345, train=True)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = peer_models(teacher, size, Path(tmp), calibration[:64])
        for a in args.artifact:  # OUT/target: artifacts of one target from several compiles differ by OUT
            models[f"ours: {a.parent.name}/{a.name}"] = a / "model.onnx"
        sessions = {name: cpu_session(p, args.threads) for name, p in models.items()}
        fidelity = {}
        for name, s in sessions.items():
            logits = run_onnx(s, views)
            fidelity[name] = agreement(logits, reference)
            if groups is not None:
                low, high = agreement_interval(logits, reference, groups)
                fidelity[name].update(top1_agreement_low95=low, top1_agreement_high95=high)
        sizes = {name: p.stat().st_size / 1e6 for name, p in models.items()}
        timing = {}
        for batch in (1, 8):
            x = (np.resize(views, (batch, *views.shape[1:])).astype(np.float32) / 255.0)
            tx = torch.from_numpy(x)
            cands = {"teacher, torch fp32": (lambda _: teacher.module(tx), [0])}
            for name, s in sessions.items():
                cands[name] = (lambda _, s=s: s.run(None, {INPUT: x}), [0])
            with torch.inference_mode():
                timing[batch] = measure_interleaved(cands, warmup=3, min_blocks=5, min_time_s=args.min_time,
                                                    block_s=0.3, settle=1)
    teacher_mb = teacher.source["fp32_mb"]
    peer = "peer: teacher + plain onnxruntime int8"
    table = Table(title=f"{teacher.name}: {len(views)} held-out views of {args.artifact[0].name}, {args.threads} threads, "
                        "interleaved; ratios = medians of paired block ratios")
    for col in ("model", "b1 ms", "b1 × teacher", "b1 × peer", "b8 img/s", "b8 × teacher", "top-1",
                *(["top-1 95%"] if groups is not None else []), "top-5", "KL", "MB", "% teacher"):
        table.add_column(col)
    for name in ["teacher, torch fp32", *models]:
        t1, t8 = timing[1][name], timing[8][name]
        speed = {b: 1 / paired_ratio(timing[b][name].block_p50_ms, timing[b]["teacher, torch fp32"].block_p50_ms)
                 for b in (1, 8)}
        vs_peer = 1 / paired_ratio(t1.block_p50_ms, timing[1][peer].block_p50_ms)
        f = fidelity.get(name, {"top1_agreement": 1.0, "top5_agreement": 1.0, "kl_teacher": 0.0})
        mb = sizes.get(name, teacher_mb)
        rows.append({"model": name, "b1_ms": t1.p50_ms, "b1_speedup_vs_teacher": speed[1], "b1_speedup_vs_peer": vs_peer,
                     "b8_images_per_s": 8000 / t8.p50_ms, "b8_speedup_vs_teacher": speed[8], **f, "size_mb": mb})
        table.add_row(name, f"{t1.p50_ms:.2f}", f"{speed[1]:.2f}", f"{vs_peer:.2f}", f"{8000 / t8.p50_ms:.0f}",
                      f"{speed[8]:.2f}", f"{f['top1_agreement']:.4f}",
                      *([f"{f.get('top1_agreement_low95', 1.0):.2f}–{f.get('top1_agreement_high95', 1.0):.2f}"]
                        if groups is not None else []), f"{f['top5_agreement']:.4f}",
                      f"{f['kl_teacher']:.4f}", f"{mb:.2f}", f"{mb / teacher_mb:.1%}")
    Console(width=200).print(table)
    if args.json:
        args.json.write_text(json.dumps({"teacher": teacher.name, "threads": args.threads, "views": len(views),
                                         "rows": rows}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
