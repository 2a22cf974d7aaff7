"""The human-readable report.md of an artifact, rendered from its manifest."""
from __future__ import annotations

from edgedistill.artifact import Manifest


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render_report(m: Manifest, published: bool) -> str:
    """Return report.md: verdict, fidelity, latency and size vs the teacher, the recipe, and the training curve."""
    lat, sizes, metrics = m.latency, m.sizes, m.metrics
    status = "published" if published else "NOT published: accuracy budget missed"
    lines = [
        f"# edgedistill artifact: {m.target['name']}",
        "",
        f"**Status:** {status}. {metrics['verdict']}.",
        "",
        f"Teacher `{m.teacher['name']}` ({m.teacher['model_type']}, {m.teacher['num_layers']} layers, "
        f"{m.teacher['num_parameters'] / 1e6:.1f}M parameters, task {m.teacher['task']}) → student with "
        f"{m.student['num_layers']} layers (from teacher layers {m.student['kept_teacher_layers']}, "
        f"{m.student['num_parameters'] / 1e6:.1f}M parameters).",
        "",
        "## Summary vs the teacher",
        "",
        "| | teacher (torch fp32) | artifact | ratio |",
        "|---|---|---|---|",
        f"| latency p50, batch {lat['batch']} × seq {lat['sequence']}, {lat['threads_measured']} threads (ms) | "
        f"{lat['teacher_torch_fp32']['p50_ms']:.2f} | {lat['artifact']['p50_ms']:.2f} | "
        f"{lat['speedup_vs_teacher']:.2f}× faster |",
        f"| size (MB) | {sizes['teacher_weights_mb']:.1f} | {sizes['model_mb']:.1f} | {sizes['size_ratio']:.1%} |",
        "",
        "## Fidelity on the held-out split",
        "",
        f"{m.data['num_validation']} held-out texts (seed {m.seed}), never seen in training.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics["values"].items()]
    lines += [
        "",
        "`torch_student_*` rows are the fp32 student before export; the gap to the rows above is what export, graph "
        "optimization and quantization cost.",
        "",
        "## Recipe",
        "",
        f"- export: {m.export['exporter']}, opset {m.export['opset']}, max |onnx - torch| {m.export['max_abs_diff_vs_torch']:.2e}",
        f"- graph optimization: {m.optimization['mode']}; fused operators: {m.optimization['fused_ops'] or 'none'}",
        f"- quantization: {m.quantization}",
        f"- runtime: {m.target['runtime']} / {m.target['execution_provider']}, profile threads {m.target['threads']}"
        f" (measured with {lat['threads_measured']} on this machine)",
        "",
        "## Distillation",
        "",
        f"Transfer set `{m.data['source']}`: {m.data['num_train']} training texts, max length {m.data['max_length']}. "
        f"Best validation fidelity {m.distillation['best_fidelity']:.4f} at step {m.distillation['best_step']}.",
        "",
        "| step | validation fidelity | train loss |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {f:.4f} | {loss:.4f} |" for s, f, loss in m.distillation["history"]]
    lines += ["", f"Latency: {lat['note']}", ""]
    return "\n".join(lines)
