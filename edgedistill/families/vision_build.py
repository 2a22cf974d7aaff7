"""The vision family's target builds: the student exported to ONNX (checked against torch) or to an ExecuTorch program,
quantized per the profile with the accuracy search, validated against the teacher on the held-out views in the
target's runtime (a GPU provider's, or onnxruntime's CPU kernels standing in for an absent GPU), timed against the
teacher, and described by the manifest."""
from __future__ import annotations

import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from edgedistill import __version__
from edgedistill.artifact import Manifest
from edgedistill.backends import unmeasured_latency
from edgedistill.bench.timer import measure_interleaved, paired_ratio
from edgedistill.distill.loop import resolved
from edgedistill.distill.qat_conv import ConvQuantSim
from edgedistill.errors import ProfileError
from edgedistill.families.base import TargetBuild
from edgedistill.families.vision_stages import (
    INPUT,
    MIN_PHOTOS_TO_HOLD_OUT,
    SEARCH_VIEWS,
    MODEL_FILE,
    OUTPUT,
    VisionDistilled,
    _example,
    calibration_views,
    crop_scale_of,
    intact,
    qat_start,
    search_floor,
    search_set,
    teacher_logits,
    val_views_per_image,
)
from edgedistill.families.vision_export import export_vision
from edgedistill.families.vision_rounding import ROUNDING_VIEWS, rounded_student, unrounded_twin
from edgedistill.families.vision_validation import VAL_PHOTOS, agreement, agreement_interval
from edgedistill.families.vision_training import RECALIBRATE_EVERY
from edgedistill.images import eval_resize, to_pixels
from edgedistill.runtimes.ort_cpu import cpu_session
from edgedistill.targets import TargetProfile
from edgedistill.teachers.hf import count_parameters


def run_onnx(session, views: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Return the logits of an onnxruntime session on uint8 views (a graph with a fixed batch gets batches of that
    size, the last one padded)."""
    fixed = session.get_inputs()[0].shape[0]
    if isinstance(fixed, int):
        batch_size = fixed
    out = []
    for i in range(0, len(views), batch_size):
        x = views[i : i + batch_size].astype(np.float32) / 255.0
        n = len(x)
        if isinstance(fixed, int) and n < fixed:
            x = np.concatenate([x, np.repeat(x[-1:], fixed - n, 0)])
        out.append(session.run(None, {INPUT: x})[0][:n])
    return np.concatenate(out)


class PteSession:
    """An ExecuTorch program behind the two onnxruntime-session calls the vision stages use (`run`, `get_inputs`),
    so validation and timing run the .pte exactly as they run an .onnx."""

    def __init__(self, path: Path, input_shape: tuple[int, ...]) -> None:
        from edgedistill.backends.executorch import load_pte

        self._run = load_pte(path)
        self._shape = list(input_shape)

    def get_inputs(self):
        from types import SimpleNamespace

        return [SimpleNamespace(name=INPUT, shape=self._shape)]

    def run(self, _outputs, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [self._run({INPUT: np.ascontiguousarray(feeds[INPUT])})]


class GpuSession:
    """A GPU provider's session (IO binding: inputs copied to the device once per distinct array, outputs bound on
    it) behind the two onnxruntime-session calls the vision stages use."""

    def __init__(self, path: Path, provider: str) -> None:
        from edgedistill.runtimes.ort_cpu import gpu_runner

        self._run, self._session = gpu_runner(path, provider)

    def get_inputs(self):
        return self._session.get_inputs()

    def run(self, _outputs, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [self._run(feeds)]


def build_pte(d: VisionDistilled, profile: TargetProfile, stage_dir: Path, opts):
    """Export the student with torch.export, quantize it by PT2E for XNNPACK (static int8) when the profile says,
    lower to the XNNPACK delegate and write model.pte; return (path, session, config, trials, export checks)."""
    import warnings

    from edgedistill.errors import ExportError
    from edgedistill.quantize.configs import XnnpackStaticInt8Config
    from edgedistill.quantize.search import Trial

    try:
        from executorch import version as et_version
    except ImportError:
        raise ExportError("the ExecuTorch target needs the executorch package", hint="run `make install`") from None
    cfg, batch = profile.vision.quantization, profile.vision.batch
    student, rounding = rounded_student(d, profile, opts)
    example = to_pixels(np.resize(d.val_views, (batch, *d.val_views.shape[1:])))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export / pytree deprecation chatter
        exported = torch.export.export(student, (example,))
        from edgedistill.backends.executorch import lower_to_pte, quantize_for_xnnpack

        if isinstance(cfg, XnnpackStaticInt8Config):
            views = calibration_views(d.train_views, cfg.calibration_texts)
            exported = quantize_for_xnnpack(exported, (example,), ((to_pixels(views[i : i + batch]),)
                                                                   for i in range(0, len(views) - batch + 1, batch)),
                                            cfg.per_channel, dynamic=False, activation_observer=cfg.calibration)
        buffer = lower_to_pte(exported)
    path = stage_dir / "model.pte"
    path.write_bytes(buffer)
    session = PteSession(path, tuple(example.shape))
    with torch.no_grad():
        diff = float(np.max(np.abs(session.run(None, {INPUT: example.numpy()})[0] - student(example).numpy())))
    views, teacher, _, floor = search_plan(d, profile)
    score = agreement(run_onnx(session, views), teacher)["top1_agreement"]
    trial = Trial("as the profile says", cfg.model_dump(mode="json"), score, score >= floor, path.stat().st_size / 1e6)
    checks = {"exporter": "torch.export -> ExecuTorch, XNNPACK delegate", "executorch": et_version.__version__,
              "fixed_batch": batch, "max_abs_diff_vs_torch": diff}
    return path, session, cfg, [trial], checks, rounding


def search_plan(d: VisionDistilled, profile: TargetProfile) -> tuple[np.ndarray, np.ndarray, str, float]:
    """Return the views quantization trials are scored on, the teacher's logits there, what they are, and the top-1
    agreement a trial must reach on them (vision_stages.search_set, search_floor)."""
    views, logits, what = search_set(d, (getattr(profile.vision.quantization, "calibration_texts", 8), ROUNDING_VIEWS))
    return views, logits, what, search_floor(profile.vision.budget.min_top1_agreement, len(views))


def build_target(d: VisionDistilled, profile: TargetProfile, stage_dir: Path, opts) -> TargetBuild:
    """Export, quantize per the profile (the accuracy search behind it), validate against the teacher, time."""
    if profile.runtime == "executorch":
        path, session, config, trials, export_checks, rounding = build_pte(d, profile, stage_dir, opts)
        return validated_build(d, profile, stage_dir, opts, {path.name: path}, path, path, session, config, trials,
                               export_checks, rounding)
    from edgedistill.quantize.search import quantize_within_budget

    from edgedistill.backends.onnxruntime import graph_structure
    from edgedistill.coverage import require_coverage
    from edgedistill.runtimes.ort_cpu import provider_unusable

    vision = profile.vision
    threads = profile.effective_threads
    student, rounding = rounded_student(d, profile, opts)
    exported, export_checks = export_vision(student, d.size, stage_dir / "export" / "student.onnx", profile.opset)
    unrounded = None  # the same graph with the weights before GPTQ, for the nodes the search keeps in float
    if rounding["method"].startswith("gptq"):
        unrounded, _ = export_vision(unrounded_twin(d, student), d.size, stage_dir / "export" / "unrounded.onnx",
                                     profile.opset)
    if profile.fixed_shape:  # mobile accelerators want static shapes: the batch is fixed to the profile's
        from edgedistill.ort_format import fix_input_shapes

        exported = fix_input_shapes(exported, {"batch": vision.batch}, stage_dir / "export" / "fixed.onnx")
        export_checks["fixed_batch"] = vision.batch
        if unrounded is not None:
            unrounded = fix_input_shapes(unrounded, {"batch": vision.batch}, stage_dir / "export" / "unrounded-fixed.onnx")
    # a GPU target whose provider cannot start here is validated on onnxruntime's CPU kernels and not timed
    unusable = provider_unusable(exported, profile.execution_provider) if profile.gpu else None

    def session_of(path: Path):
        if profile.gpu and not unusable:
            return GpuSession(path, profile.execution_provider)
        return cpu_session(path, threads)

    n_cal = getattr(vision.quantization, "calibration_texts", 8)
    search_views, search_teacher, _, floor = search_plan(d, profile)
    calibration = [{INPUT: v[None].astype(np.float32) / 255.0} for v in calibration_views(d.train_views, n_cal)]

    def evaluate(path: Path) -> float:
        return agreement(run_onnx(session_of(path), search_views), search_teacher)["top1_agreement"]

    def probe_error(path: Path) -> float:  # top-1 ties on most probes (52 of 88 on MobileNetV2); KL ranks them all
        n = min(SEARCH_VIEWS, len(search_views))
        return agreement(run_onnx(session_of(path), search_views[:n]), search_teacher[:n])["kl_teacher"]

    (stage_dir / "trials").mkdir(parents=True, exist_ok=True)
    model_path, config, trials = quantize_within_budget(exported, vision.quantization, stage_dir / "trials", calibration,
                                                        evaluate, floor, float_source=unrounded,
                                                        probe_error=probe_error)
    final = stage_dir / MODEL_FILE
    final.write_bytes(model_path.read_bytes())
    files = {MODEL_FILE: final}
    device_file = final
    model_record: dict = {}
    if profile.gpu:  # checked by structure and by the provider's operator table wherever it runs
        model_record = {"structure": graph_structure(final),
                        "coverage": require_coverage(final, profile.execution_provider).as_dict()}
        if unusable:
            model_record["validated_with"] = "CPUExecutionProvider (the same graph on onnxruntime's CPU kernels)"
    if profile.model_format == "ort":
        from edgedistill.ort_format import DISABLED_OPTIMIZERS, convert_to_ort

        ort_model = convert_to_ort(final, stage_dir / "ort")
        files.update({ort_model.model.name: ort_model.model, ort_model.operators_config.name: ort_model.operators_config})
        reference = run_onnx(cpu_session(final, 1, disabled_optimizers=DISABLED_OPTIMIZERS), d.val_views[:16])
        export_checks["ort_format_max_abs_diff_vs_onnx"] = float(np.abs(
            run_onnx(cpu_session(ort_model.model, 1), d.val_views[:16]) - reference).max())
        device_file = ort_model.model  # validate and time what the device runs
    elif profile.model_format != "onnx":
        raise ProfileError(f"target {profile.name} asks for a {profile.model_format} model, which the vision family "
                           "does not build", hint="use model_format onnx or ort, or another target")
    return validated_build(d, profile, stage_dir, opts, files, final, device_file, session_of(device_file),
                           config, trials, export_checks, rounding, model_record, not_measured=unusable)


def student_logits(d: VisionDistilled, views: np.ndarray) -> np.ndarray:
    """Return the torch student's logits on `views`; a quantization-aware student's through its int8 rounding
    (ranges measured on the calibration views), which is what its artifact is meant to equal."""
    student = d.trained.student.eval()
    sim = None
    if d.quantization_aware:
        sim = ConvQuantSim(student, _example(d.size), weight_levels=d.weight_levels)
        sim.calibrate(to_pixels(calibration_views(d.train_views, d.quantization_aware)))
    try:
        return teacher_logits(student, views, batch_size=64)
    finally:
        if sim is not None:
            sim.remove()


def validated_build(d: VisionDistilled, profile: TargetProfile, stage_dir: Path, opts, files: dict[str, Path],
                    model_path: Path, device_file: Path, session, config, trials, export_checks: dict, rounding: dict,
                    model_record: dict | None = None, not_measured: str | None = None) -> TargetBuild:
    """Validate what the device runs (`session`) against the teacher on the held-out views, time it (unless
    `not_measured` says why its device is not here), and assemble the artifact's files and manifest."""
    vision = profile.vision
    artifact_logits = run_onnx(session, d.val_views)
    metrics = agreement(artifact_logits, d.val_logits)
    if d.val_groups is not None and len(np.unique(d.val_groups)) > 1:
        metrics["top1_agreement_low95"], metrics["top1_agreement_high95"] = agreement_interval(
            artifact_logits, d.val_logits, d.val_groups)
    for k, v in agreement(student_logits(d, d.val_views), d.val_logits).items():
        metrics[f"torch_student_{k}"] = v
    if d.val_labels is not None:
        ours = artifact_logits.argmax(-1)
        metrics["label_accuracy"] = float((ours == d.val_labels).mean())
        metrics["teacher_label_accuracy"] = float((d.val_logits.argmax(-1) == d.val_labels).mean())
    passed = metrics["top1_agreement"] >= vision.budget.min_top1_agreement
    verdict = (f"top-1 agreement {metrics['top1_agreement']:.4f} {'≥' if passed else '<'} the budget's "
               f"{vision.budget.min_top1_agreement:g}")
    latency = (unmeasured_latency(profile, not_measured, {"batch": vision.batch, "image_size": d.size}) if not_measured
               else measure_vision_latency(d, session, profile))
    np.save(stage_dir / "validation-views.npy", d.val_views)
    np.save(stage_dir / "validation-teacher.npy", d.val_logits.astype(np.float32))
    files.update({"validation-views.npy": stage_dir / "validation-views.npy",
                  "validation-teacher.npy": stage_dir / "validation-teacher.npy"})
    if "top1_agreement_low95" in metrics:  # the photo each view was cut from: verify and bench re-derive the interval
        np.save(stage_dir / VAL_PHOTOS, d.val_groups.astype(np.int32))
        files[VAL_PHOTOS] = stage_dir / VAL_PHOTOS
    manifest = vision_manifest(d, profile, model_path, config, trials, export_checks, metrics, passed, verdict, latency,
                               opts, device_file, model_record or {}, rounding)
    return TargetBuild(files, manifest, passed)


def measure_vision_latency(d: VisionDistilled, session, profile: TargetProfile) -> dict:
    """Return the artifact's and the teacher's (torch fp32) latency at the profile's batch, interleaved."""
    batch = profile.vision.batch
    views = np.resize(d.val_views, (batch, *d.val_views.shape[1:]))
    x = views.astype(np.float32) / 255.0
    # a GPU artifact is compared with the teacher on the same GPU when torch has one (`.cpu()` waits for the kernels)
    device = "cuda" if profile.gpu and torch.cuda.is_available() else "cpu"
    tx = torch.from_numpy(x).to(device)
    module = d.teacher.module.to(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(profile.effective_threads)
    try:
        with torch.inference_mode():
            stats = measure_interleaved({"artifact": (lambda _: session.run(None, {INPUT: x}), [0]),
                                         "teacher": (lambda _: module(tx).cpu(), [0])},
                                        warmup=3, min_blocks=5, min_time_s=3.0, block_s=0.3, settle=1)
    finally:
        torch.set_num_threads(previous)
        d.teacher.module.to("cpu")
    speedup = 1.0 / paired_ratio(stats["artifact"].block_p50_ms, stats["teacher"].block_p50_ms)
    return {"batch": batch, "image_size": d.size, "threads_profile": profile.threads,
            "threads_measured": profile.effective_threads, "teacher_device": device,
            **{k: v.as_dict() for k, v in stats.items()},
            "speedup_vs_teacher": speedup,
            "note": f"batch {batch} x 3 x {d.size} x {d.size}; teacher = torch fp32; interleaved ~0.3 s blocks, the "
                    "speed-up is the median of paired block ratios."}


def vision_manifest(d: VisionDistilled, profile: TargetProfile, model_path: Path, config, trials, export_checks: dict,
                    metrics: dict, passed: bool, verdict: str, latency: dict, opts, device_file: Path,
                    model_record: dict, rounding: dict) -> Manifest:
    import onnx
    import onnxruntime

    teacher, trained = d.teacher, d.trained
    crop_scale = crop_scale_of(opts)
    ops: dict[str, int] = {}
    if model_path.suffix == ".onnx":
        for node in onnx.load(str(model_path), load_external_data=False).graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    model_mb = device_file.stat().st_size / 1e6  # what the device loads
    teacher_mb = teacher.source["fp32_mb"]
    return Manifest(
        family="vision",
        edgedistill_version=__version__,
        target=profile.model_dump(mode="json"),
        teacher={"name": teacher.name, "sha256": teacher.sha256, "task": teacher.task,
                 "num_parameters": count_parameters(teacher.module), "source": teacher.source},
        student={"num_parameters": count_parameters(trained.student), "pruning": d.pruning},
        data={"source": d.data.source, "sha256": d.data.sha256, "num_images": len(d.data),
              "num_train_images": d.num_train_images, "num_validation_images": d.num_val_images,
              "views_per_train_image": d.views_per_image, "num_train": len(d.train_views),
              "num_validation": len(d.val_views), "image_size": d.size, "val_fraction": opts.val_fraction,
              "photos_held_out": d.photos_held_out,
              "crop_scale": crop_scale, "resize_px": eval_resize(d.size, opts.resize),
              "views": f"train: random-resized crop (scale {crop_scale:g}-1), flip, colour jitter 0.8-1.2, seeded; "
                       f"held out: the center crop (resize {eval_resize(d.size, opts.resize)}) of each "
                       + ("held-out photo" if d.photos_held_out else
                          f"photo (fewer than {MIN_PHOTOS_TO_HOLD_OUT}: none could be held out, so these are crops "
                          "of the training photos with another seed)")
                       + (f" plus {val_views_per_image(d.num_val_images)} augmented views"
                          if val_views_per_image(d.num_val_images) else ""),
              "labels": d.val_labels is not None, "class_names": d.data.class_names},
        distillation={"config": asdict(d.distill_config or resolved(opts.distill)), "best_validation_top1_agreement": trained.best_fidelity,
                      "quantization_aware": None if not d.quantization_aware else {
                          "simulated": "static int8 as onnxruntime's QDQ rounds it (XNNPACK's is the same grid shifted "
                                       "by 128): per-channel symmetric int8 weights (max|w|/127), "
                                       "uint8 min-max activations at every Conv/Gemm input and output, Conv+ReLU6 "
                                       "fused; BatchNorm folded", "calibration_views": d.quantization_aware,
                          "recalibrate_every_steps": RECALIBRATE_EVERY,
                          "from_step": qat_start(len(d.train_views), d.distill_config or opts.distill, intact(d.pruning))},
                      "teacher_outputs": ("computed on fresh crops every step" + (f", mixup {opts.mixup:g}" if opts.mixup else "")
                                          if opts.fresh_views else "cached on the fixed training views")
                                         + ("; its stage outputs computed on every batch" if d.feature_stages else ""),
                      "feature_matching": None if not d.feature_stages else {
                          "weight": opts.feature_weight, "stages": d.feature_stages,
                          "loss": "MSE of 1x1-projected student stage outputs to the teacher's / mean(teacher²), "
                                  "mean over stages; projectors start at least squares and are dropped"},
                      "best_step": trained.best_step, "history": trained.history},
        export=export_checks,
        optimization={"mode": "onnxruntime session optimizations (ORT_ENABLE_ALL) at load"},
        quantization={"profile": profile.vision.quantization.model_dump(mode="json"),
                      "chosen": config.model_dump(mode="json"), "weight_rounding": rounding,
                      "operators": dict(sorted(ops.items())),
                      **dict(zip(("search_views", "search_floor"), search_plan(d, profile)[2:])),
                      "trials": [asdict(t) for t in trials]},
        model={"file": device_file.name, "format": device_file.suffix.lstrip("."),
               **({"onnx_file": MODEL_FILE, "device_execution_providers": profile.device_execution_providers}
                  if device_file.suffix == ".ort" else {}),
               **({"device_execution_providers": ["XNNPACK"], "input_shape": [profile.vision.batch, 3, d.size, d.size]}
                  if device_file.suffix == ".pte" else {}),
               "inputs": [INPUT], "outputs": [OUTPUT],
               "input": f"float32 (batch, 3, {d.size}, {d.size}) RGB in [0, 1]; normalization is in the graph",
               "preprocess": teacher.source.get("preprocess"), **model_record},
        metrics={"values": metrics, "budget": profile.vision.budget.model_dump(), "passed": passed, "verdict": verdict},
        latency=latency,
        sizes={"model_mb": model_mb, "teacher_weights_mb": teacher_mb, "size_ratio": model_mb / teacher_mb},
        versions={"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                  "onnxruntime": onnxruntime.__version__, "platform": platform.platform()},
        seed=opts.distill.seed,
    )
