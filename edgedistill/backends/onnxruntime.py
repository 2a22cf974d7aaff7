"""The ONNX Runtime backend: export, fix shapes, fuse, quantize within the budget, and (mobile) convert to ORT format."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from edgedistill.backends import BuildContext, Built, register_backend, trial_latency
from edgedistill.bench.timer import time_block
from edgedistill.coverage import require_coverage
from edgedistill.errors import ExportError
from edgedistill.export import export_onnx
from edgedistill.optimize import optimize_graph
from edgedistill.ort_format import DISABLED_OPTIMIZERS, convert_to_ort, fix_input_shapes
from edgedistill.quantize.search import quantize_within_budget
from edgedistill.runtimes import iter_batches
from edgedistill.runtimes.ort_cpu import cpu_session, gpu_runner, provider_unusable

MODEL_FILE = "model.onnx"


def _runner(path: Path, threads: int, provider: str = "CPUExecutionProvider"):
    """Return (run, fixed (batch, sequence) or None) for the model on `provider`; GPU providers use IO binding."""
    if provider != "CPUExecutionProvider":
        run, session = gpu_runner(path, provider)
    else:
        session = cpu_session(path, threads)
        run = lambda feeds: session.run(None, feeds)[0]  # noqa: E731
    dims = session.get_inputs()[0].shape[:2]
    fixed = (dims[0], dims[1]) if all(isinstance(d, int) for d in dims) else None
    return run, fixed


def graph_structure(model_path: Path) -> dict:
    """Return the structural facts a GPU artifact is checked by when it cannot run here: the onnx checker passes,
    initializer element types, operators by domain."""
    model = onnx.load(str(model_path))
    onnx.checker.check_model(model, full_check=False)
    dtypes: dict[str, int] = {}
    for t in model.graph.initializer:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        dtypes[name] = dtypes.get(name, 0) + 1
    return {"onnx_checker": "passed", "initializer_types": dict(sorted(dtypes.items())),
            "contrib_ops": sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft"})}


def _io(model_path: Path) -> dict:
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return {kind: [{"name": v.name, "elem_type": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
                    "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in vs]
            for kind, vs in (("inputs", graph.input), ("outputs", graph.output))}


@register_backend("onnxruntime")
def build_onnxruntime(profile, ctx: BuildContext, stage_dir: Path, runner=None) -> Built:
    """Export, fuse and quantize for onnxruntime; `runner(path) -> (run, fixed)` runs a graph where it is validated
    and timed (default: an onnxruntime session on the profile's provider, the CPU standing in for an absent GPU)."""
    threads = profile.effective_threads
    provider = profile.execution_provider
    unusable = None
    onnx_model = export_onnx(ctx.student, ctx.family, ctx.input_names, profile.opset, stage_dir / "student.onnx")
    graph = onnx_model.path
    if profile.fixed_shape:
        graph = fix_input_shapes(graph, {"batch": profile.input_shape.batch, "sequence": profile.input_shape.sequence},
                                 stage_dir / "fixed.onnx")
    optimized = optimize_graph(graph, ctx.family, ctx.student.model.config, profile.optimization, stage_dir / "optimized.onnx",
                               fuse_embeddings=getattr(profile.quantization, "embedding_bits", 8) != 4,
                               fuse_skip_layer_norm=provider != "CPUExecutionProvider")
    if profile.gpu:
        unusable = provider_unusable(optimized.path, provider)
    here = "CPUExecutionProvider" if unusable else provider
    runner = runner or (lambda p: _runner(p, threads, here))
    shape = profile.input_shape
    calibration = [feeds for _, feeds in iter_batches(ctx.tokenizer, ctx.calibration_texts, ctx.input_names,
                                                      shape.sequence, shape.batch, fixed=True)]
    timed = here == provider  # a GPU target's trials are not timed on the CPU that stands in for its provider
    session: dict[Path, tuple] = {}

    def trial_runner(p: Path):  # one session per trial, shared by its fidelity and its timing
        if p not in session:
            session.clear()
            session[p] = runner(p)
        return session[p]

    model_path, chosen, trials = quantize_within_budget(
        optimized.path, profile.quantization, stage_dir, calibration, lambda p: ctx.fidelity(*trial_runner(p)),
        ctx.floor, lambda p: _trial_ms(trial_runner(p)[0], calibration[0]) if timed else None)
    session.clear()
    files = {MODEL_FILE: model_path}
    record = {
        "export": {"exporter": "torch.onnx.export (TorchScript, dynamo=False)", "opset": onnx_model.opset,
                   "max_abs_diff_vs_torch": onnx_model.max_abs_diff},
        "optimization": {"mode": profile.optimization, "fused_ops": optimized.fused_ops},
        "quantization": {"profile": profile.quantization.model_dump(mode="json"), "chosen": chosen.model_dump(mode="json"),
                         "trials": [asdict(t) for t in trials]},
        "model": {"file": MODEL_FILE, "format": "onnx", **_io(model_path)},
    }
    not_measured = None
    if profile.gpu:
        record["model"]["structure"] = graph_structure(model_path)
        record["model"]["coverage"] = require_coverage(model_path, provider).as_dict()
        if unusable:
            not_measured = unusable
            record["model"]["validated_with"] = "CPUExecutionProvider (the same graph on onnxruntime's CPU kernels)"
    run, fixed = runner(model_path)
    device_file = MODEL_FILE
    if profile.model_format == "ort":
        ort_model = convert_to_ort(model_path, stage_dir / "ort")
        files.update({ort_model.model.name: ort_model.model, ort_model.operators_config.name: ort_model.operators_config})
        ort_run, _ = _runner(ort_model.model, 1)
        # the ONNX graph optimized as the converter optimized it: a static-int8 graph's rounding is that sensitive
        onnx_session = cpu_session(model_path, 1, disabled_optimizers=DISABLED_OPTIMIZERS)
        reference = lambda feeds: onnx_session.run(None, feeds)[0]  # noqa: E731
        diff = _max_diff(ort_run, reference, ctx, fixed)
        record["export"]["ort_format_max_abs_diff_vs_onnx"] = diff
        record["model"].update(file=ort_model.model.name, format="ort", onnx_file=MODEL_FILE,
                               device_execution_providers=profile.device_execution_providers)
        run, _ = _runner(ort_model.model, threads)  # validate and time what the device runs
        device_file = ort_model.model.name
    return Built(files, run, fixed, device_file, record, not_measured)


def _trial_ms(run, feeds: dict[str, np.ndarray]) -> float:
    """Return a quick median ms of one trial (trial_latency; timed inside the runtime when it times itself)."""
    if hasattr(run, "time_calls"):
        return float(np.median(time_block(run, [feeds], 0, 10, settle=2)))
    return trial_latency(run, feeds)


@register_backend("onnxruntime-web")
def build_onnxruntime_web(profile, ctx: BuildContext, stage_dir: Path) -> Built:
    """The onnxruntime recipes' graph, every trial validated (and the artifact timed) by onnxruntime-web in headless
    Chromium; the page that runs it (index.html, onnxruntime-web's files, the JS tokenizer) ships beside the model,
    and runs once, screenshotted, before the artifact is accepted. A profile whose provider has no device here
    (webgpu without an adapter) is validated on the same browser's wasm provider and not timed."""
    from edgedistill.runtimes import ort_web

    browser = ort_web.shared_browser()  # before any work: a missing browser is one line naming the package
    ep, not_measured = profile.execution_provider, None
    if ep == "webgpu":
        adapter = ort_web.webgpu_adapter(browser)
        if adapter != "adapter":
            ep, not_measured = "wasm", f"no WebGPU adapter ({adapter})"
    pages: list = []

    def page_runner(path: Path):
        while pages:  # one page per graph: a trial's page is closed when the next one opens
            pages.pop().close()
        pages.append(ort_web.PageRunner(browser, path, ep, profile.effective_threads))
        return pages[-1], (profile.input_shape.batch, profile.input_shape.sequence) if profile.fixed_shape else None

    built = build_onnxruntime(profile, ctx, stage_dir, runner=page_runner)
    page = ort_web.build_page(built.files[MODEL_FILE], built.run, ctx.tokenizer, ctx.max_length, ctx.input_names, ctx.student.task,
                              ctx.student.model.config, profile, stage_dir / "page")
    record = built.record["model"]
    record["browser"] = {**built.run.settings, "page": page.record}
    record["validated_with"] = (f"onnxruntime-web {built.run.settings['onnxruntime_web']} ({ep}, "
                                f"{built.run.settings['wasm_threads']} threads) in {built.run.settings['browser']}")
    built.files.update(page.files)
    built.not_measured = not_measured
    return built


def _max_diff(a, b, ctx: BuildContext, fixed) -> float:
    """Return max |a - b| on calibration text; raise ExportError past 1e-3 (the two must be the same model)."""
    batch, seq = fixed or (8, ctx.max_length)
    diff = 0.0
    for _, feeds in iter_batches(ctx.tokenizer, ctx.calibration_texts[:32] or ["a"], ctx.input_names, seq, batch,
                                 fixed=fixed is not None):
        diff = max(diff, float(np.max(np.abs(a(feeds) - b(feeds)))))
    if diff > 1e-3:
        raise ExportError(f"the ORT-format model differs from the ONNX model by {diff:.2e}", hint="report this model")
    return diff
