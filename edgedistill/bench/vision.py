"""`edgedistill bench` for image classifiers: the teacher in torch fp32, the peer path (the teacher exported and
statically quantized by onnxruntime the plain way, no distillation) and the artifacts, on the artifact's held-out
views, interleaved at batch 1 and 8 on the same threads; top-1 / top-5 agreement and KL to the teacher, with top-1's
95% interval over the held-out photos when the artifact carries validation-photos.npy."""
from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from edgedistill.artifact import Manifest, verify_files
from edgedistill.bench.results import BenchResult, ModelResult
from edgedistill.bench.timer import measure_interleaved, paired_ratio, summarize
from edgedistill.errors import ArtifactError, EdgeDistillError
from edgedistill.progress import console, enabled
from edgedistill.teachers import Teacher

PEER = ("the teacher exported to ONNX and statically quantized by onnxruntime's quantize_static without distillation "
        "or search: QDQ, per-channel int8 weights, uint8 activations, min-max on 64 crops of the built-in photos, op "
        "types Conv and Gemm")
PEER_CALIBRATION_SEED = 12345  # another seed than any compile's views


def peer_models(teacher: Teacher, size: int, work: Path, calibration: np.ndarray,
                weights: dict | None = None) -> dict[str, Path]:
    """Return the teacher exported (fp32) and quantized without distillation: plainly (the peer), and with our
    recipe (Conv+ReLU6 fused, the weight storage of the artifacts' profile: `weights`, e.g. {"reduce_range": True}
    for x86-64-avx2), keyed by row name."""
    from edgedistill.families.vision_export import export_vision
    from edgedistill.families.vision_stages import INPUT
    from edgedistill.quantize import quantize
    from edgedistill.quantize.configs import StaticQdqInt8Config

    fp32, _ = export_vision(teacher.module, size, work / "teacher.onnx", 17)
    feeds = [{INPUT: v[None].astype(np.float32) / 255.0} for v in calibration]
    plain = quantize(fp32, StaticQdqInt8Config(op_types=["Conv", "Gemm"], calibration_texts=len(feeds), search=False),
                     work / "peer-int8.onnx", feeds)
    ours = quantize(fp32, StaticQdqInt8Config(op_types=["Conv", "Gemm", "Clip"], calibration_texts=len(feeds),
                                              search=False, **(weights or {})), work / "teacher-int8-fused.onnx", feeds)
    return {"teacher, onnxruntime fp32": fp32, "peer: teacher + plain onnxruntime int8": plain,
            "teacher + our int8 recipe (no distillation)": ours}


def peer_calibration(size: int) -> np.ndarray:
    """Return 64 crops of the built-in photos the peer calibrates on."""
    from edgedistill.images import load_image_set, make_views

    photos = load_image_set(None, None)
    views, _ = make_views(photos.images, max(1, -(-64 // len(photos))), size, PEER_CALIBRATION_SEED, train=True)
    return views[:64]


def vision_teacher(manifests: dict[Path, Manifest], teacher_spec: str | None):
    """Return (teacher, spec, how to build it) for the artifacts: --teacher if given, else the built-in the manifest
    names, else the user's model rebuilt as the manifest records it (file, --arch, --arch-kwargs, normalization,
    crop); the sha256 must match."""
    from edgedistill.teachers import load_teacher
    from edgedistill.teachers.vision import BUILTIN_VISION_TEACHERS, UserVisionModel

    shas = {m.teacher["sha256"] for m in manifests.values()}
    if len(shas) > 1:
        raise ArtifactError("the artifacts come from different teachers", hint="bench artifacts of one teacher at a time")
    m = next(iter(manifests.values()))
    source, name = m.teacher.get("source") or {}, m.teacher["name"]
    pre = source.get("preprocess") or {}
    user = UserVisionModel(source.get("arch"), source.get("arch_kwargs"),
                           ",".join(repr(float(v)) for v in pre.get("mean", (0.0, 0.0, 0.0))) + "/"
                           + ",".join(repr(float(v)) for v in pre.get("std", (1.0, 1.0, 1.0))),
                           int(pre.get("crop_px") or m.data["image_size"]))
    spec = teacher_spec or (name if name in BUILTIN_VISION_TEACHERS else source.get("file"))
    if spec is None:
        raise ArtifactError(f"the manifest does not say where its teacher ({name}) is", hint="pass --teacher PATH")
    try:
        teacher = load_teacher(spec, "image-classification", vision_model=user)
    except EdgeDistillError as e:
        if teacher_spec is None:
            raise ArtifactError(f"cannot load the teacher recorded in the manifest ({spec}): {e.message}",
                                hint=e.hint or "pass --teacher PATH") from None
        raise
    if teacher.sha256 not in shas:
        raise ArtifactError(f"teacher {spec} is not the one the artifacts were compiled from (sha256 differs)",
                            hint="pass the --teacher the artifacts were compiled from")
    return teacher, spec, user


def _session(d: Path, m: Manifest, threads: int):
    """Return (session, runtime name, reason not measured) for an artifact, in its own runtime on this machine."""
    from edgedistill.runtimes.ort_cpu import cpu_session, provider_unusable

    path = d / m.model["file"]
    if path.suffix == ".pte":
        from edgedistill.families.vision_build import PteSession

        return PteSession(path, tuple(m.model["input_shape"])), "executorch", None
    provider = m.target.get("execution_provider", "CPUExecutionProvider")
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        reason = provider_unusable(path, provider)
        if reason:
            return None, provider, reason
        from edgedistill.families.vision_build import GpuSession

        return GpuSession(path, provider), provider, None
    return cpu_session(path, threads), "ort-cpu", None


def _probe_memory(results: list[ModelResult], files: dict[int, Path], spec: str, user: dict, threads: int,
                  batch: int, size: int) -> None:
    """Peak RSS of a fresh process per model (imports, session or teacher load, 20 runs at `batch`): the teacher in
    torch and every onnxruntime model on the CPU; an ExecuTorch or GPU artifact says why it was not probed."""
    from edgedistill.bench.memory import measure_peak_rss

    for i, r in enumerate(results):
        if r.status != "measured":
            continue
        if i and r.runtime != "ort-cpu":
            r.notes.append(f"peak memory not measured: the probe runs onnxruntime's CPU kernels, not {r.runtime}")
            continue
        kind, target = ("teacher", spec) if i == 0 else ("onnx", str(files[i]))
        try:
            mem = measure_peak_rss(kind, target, threads, batch, size, 0, vision_model=user)
        except RuntimeError as e:
            r.notes.append(f"peak memory not measured: {e}")
            continue
        r.peak_rss_mb, r.rss_growth_mb = mem["peak_rss_mb"], mem["peak_rss_mb"] - mem["rss_after_imports_mb"]


def run_vision_bench(artifact_dirs: list[Path], teacher_spec: str | None, threads: int | None, batches: list[int],
                     min_time_s: float, rounds: int, peer: bool = True, memory: bool = True) -> BenchResult:
    """Measure image-classifier artifacts against their teacher (torch fp32) and the peer path."""
    from edgedistill.bench.runner import ISA_FLAGS, _cpu_name, artifact_label, shape_latency
    from edgedistill.families.vision_build import run_onnx
    from edgedistill.families.vision_stages import INPUT
    from edgedistill.families.vision_validation import VAL_PHOTOS, agreement, agreement_interval
    from edgedistill.targets import cpu_flags

    manifests = {d: verify_files(d) for d in artifact_dirs}
    teacher, spec, user = vision_teacher(manifests, teacher_spec)
    first = next(iter(manifests))
    size = int(manifests[first].data["image_size"])
    views = np.load(first / "validation-views.npy", allow_pickle=False)
    groups = np.load(first / VAL_PHOTOS, allow_pickle=False) if (first / VAL_PHOTOS).is_file() else None
    threads = min(threads or min(m.target["threads"] for m in manifests.values()), os.cpu_count() or 1)
    reference = np.load(first / "validation-teacher.npy", allow_pickle=False)  # what compile computed (sha256 checked)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)

    def fidelity(logits: np.ndarray) -> dict[str, float]:
        out = agreement(logits, reference)
        if groups is not None:
            out["top1_agreement_low95"], out["top1_agreement_high95"] = agreement_interval(logits, reference, groups)
        return out

    results = [ModelResult(name=f"teacher ({teacher.name})", role="teacher", runtime="torch",
                           model_size_mb=teacher.source["fp32_mb"],
                           runtime_settings={"torch": torch.__version__, "intra_op_threads": threads})]
    sessions: dict[int, object] = {}
    files: dict[int, Path] = {}  # the model file of each onnxruntime or ExecuTorch row, for the memory probe
    fixed: dict[int, int] = {}  # a model whose batch is fixed (a .pte, a mobile .ort) is timed at that batch only
    with tempfile.TemporaryDirectory() as tmp:
        from edgedistill.runtimes.ort_cpu import cpu_session

        if peer:
            static = [m.quantization.get("profile") or {} for m in manifests.values()]
            static = [q for q in static if q.get("recipe") == "static-qdq-int8"]
            weights = {k: True for k in ("reduce_range", "unsigned_weights") if static and static[0].get(k)}
            for name, path in peer_models(teacher, size, Path(tmp), peer_calibration(size), weights).items():
                r = ModelResult(name=name, role="peer", runtime="ort-cpu", model_file=path.name,
                                model_size_mb=path.stat().st_size / 1e6, runtime_settings={"intra_op_threads": threads},
                                notes=[PEER] if name.startswith("peer") else
                                [f"weights stored as the artifact's profile says: {weights}"] if weights else [])
                sessions[len(results)] = cpu_session(path, threads)
                files[len(results)] = path
                results.append(r)
        for d, m in manifests.items():
            session, runtime, reason = _session(d, m, threads)
            r = ModelResult(name=artifact_label(d, m, manifests), role="artifact", runtime=runtime, artifact_dir=str(d),
                            model_file=m.model["file"], model_size_mb=(d / m.model["file"]).stat().st_size / 1e6,
                            runtime_settings={"intra_op_threads": threads})
            if reason is not None:
                r.status, r.reason = "not measured", reason
                results.append(r)
                continue
            shape = session.get_inputs()[0].shape[0]
            if isinstance(shape, int):
                fixed[len(results)] = shape
            sessions[len(results)] = session
            files[len(results)] = d / m.model["file"]
            results.append(r)
        for i, s in sessions.items():
            results[i].accuracy = fidelity(run_onnx(s, views))
        for batch in batches:
            x = np.resize(views, (batch, *views.shape[1:])).astype(np.float32) / 255.0
            tx = torch.from_numpy(x)
            timed = {"0": (lambda _: teacher.module(tx), [0])}
            for i, s in sessions.items():
                if i in fixed and fixed[i] != batch:
                    results[i].notes.append(f"batch {batch} not measured: the model's batch is fixed at {fixed[i]}")
                    continue
                timed[str(i)] = (lambda _, s=s: s.run(None, {INPUT: x}), [0])
            if enabled():
                console.print(f"timing batch {batch} × {size}×{size} px, {threads} threads, {len(timed)} models "
                              f"interleaved, {rounds} round(s) of ≥{min_time_s:g} s")
            with torch.inference_mode():
                measured = [measure_interleaved(timed, warmup=3, min_blocks=5, min_time_s=min_time_s, block_s=0.3,
                                                settle=1) for _ in range(rounds)]
            for key in timed:
                i = int(key)
                lat = shape_latency(summarize([v for stats in measured for v in stats[key].samples_ms]), batch, size, threads)
                results[i].latency.append(lat)
                per_round = [paired_ratio(stats[key].block_p50_ms, stats["0"].block_p50_ms) for stats in measured]
                results[i].ratio_to_teacher[lat.key] = statistics.median(per_round)
                if i:
                    results[i].ratio_rounds[lat.key] = [round(v, 4) for v in per_round]
        if memory:
            _probe_memory(results, files, spec, asdict(user), threads, batches[0], size)
    torch.set_num_threads(previous)
    return BenchResult(
        created_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        machine={"platform": platform.platform(), "machine": platform.machine(), "processor": _cpu_name(),
                 "cpu_isa": sorted(cpu_flags() & ISA_FLAGS), "cores": os.cpu_count()},
        teacher={"name": teacher.name, "sha256": teacher.sha256, "task": teacher.task},
        data={"source": f"{first}/validation-views.npy", "num_views": int(len(views)),
              "num_photos": None if groups is None else int(len(np.unique(groups)))},
        settings={"threads": threads, "batches": batches, "image_size": size, "min_time_s_per_shape": min_time_s,
                  "rounds": rounds, "peer": PEER if peer else None,
                  "memory_probe": f"fresh process, batch {batches[0]}, 20 runs" if memory else None,
                  "timing": "interleaved ~0.3 s blocks, 1 untimed call each; the same views for every model; "
                            "ratio_to_teacher = median over rounds of each round's median of paired block-median "
                            "ratios; a latency's `sequence` is the image side in pixels"},
        results=results,
    )
