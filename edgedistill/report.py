"""The human-readable report.md of an artifact, rendered from its manifest."""
from __future__ import annotations

from edgedistill.artifact import Manifest


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _recipe(cfg: dict) -> str:
    rest = ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "recipe" and v not in (None, [], ()))
    return f"{cfg['recipe']} ({rest})" if rest else cfg["recipe"]


def warnings_for(m: Manifest) -> list[str]:
    """Return what a reader should know before trusting the verdict."""
    out = []
    n_val = m.data["num_validation"]
    lm = m.family == "causal-lm"
    if m.family == "vision":
        if not m.data.get("photos_held_out", True):
            out.append(f"Only {m.data['num_images']} photos: the held-out views are other crops of the training photos, "
                       "so the verdict says how well the student matches the teacher on these photos, not on new ones; "
                       "pass a folder of 50 or more images (--data) for a held-out verdict.")
        elif m.data["num_validation_images"] < 20:
            out.append(f"The verdict rests on views of only {m.data['num_validation_images']} held-out photos; pass a "
                       "larger image folder (--data) before trusting it.")
    elif (lm and n_val * m.data["window_tokens"] < 10_000) or (not lm and n_val < 200):
        held = f"{n_val} windows ({n_val * m.data['window_tokens']:,} tokens)" if lm else f"{n_val} texts"
        out.append(f"The verdict rests on only {held} held out; pass more data or a larger --val-fraction "
                   "before trusting it.")
    if m.distillation["best_step"] == 0 and m.distillation.get("history"):  # no history: not distilled, on purpose
        out.append("Distillation never beat the initial student (step 0): this artifact is the student as derived "
                   "from the teacher, without training. Check --lr, --epochs and the transfer set.")
    lat = m.latency
    if lat.get("host_lacks_cpu_flags"):
        out.append(f"This machine lacks the target CPU's {', '.join(lat['host_lacks_cpu_flags'])}: fidelity and latency "
                   "were measured with its kernels, and onnxruntime's int8 kernels differ between CPUs (without VNNI "
                   "they add products in int16, which 8-bit weights can saturate); run `edgedistill verify` on the "
                   "target CPU before trusting the verdict.")
    if "not_measured" in lat:
        out.append(f"Latency not measured: {lat['not_measured']}. "
                   + (f"Fidelity was computed with {m.model['validated_with']}." if "validated_with" in m.model else ""))
    elif lat["threads_measured"] < lat["threads_profile"] and not m.target["execution_provider"].startswith(("CUDA", "Tensorrt")):
        out.append(f"Latency was measured with {_plural(lat['threads_measured'], 'thread')} (this machine's cores), "
                   f"not the profile's {lat['threads_profile']}.")
    return out


def latency_cell(lat: dict) -> str:
    """Return the artifact's p50 and speed-up (or why it was not measured) in one short cell."""
    if "not_measured" in lat:
        return f"not measured: {lat['not_measured'].split(':')[0]}"
    return (f"{lat['artifact']['p50_ms']:.2f} ({lat['speedup_vs_teacher']:.1f}×, "
            f"{_plural(lat['threads_measured'], 'thread')})")


def _latency_row(lat: dict) -> str:
    if "not_measured" in lat:
        return f"| latency, batch {lat['batch']} × seq {lat['sequence']} | — | not measured: {lat['not_measured']} | — |"
    return (f"| latency p50, batch {lat['batch']} × seq {lat['sequence']}, {_plural(lat['threads_measured'], 'thread')} (ms) | "
            f"{lat['teacher_torch_fp32']['p50_ms']:.2f} | {lat['artifact']['p50_ms']:.2f} | "
            f"{lat['speedup_vs_teacher']:.2f}× faster |")


def coverage_lines(m: Manifest) -> list[str]:
    """Return the report lines of a GPU artifact's structural checks and operator coverage (none for other targets)."""
    cov, structure = m.model.get("coverage"), m.model.get("structure")
    lines = []
    if structure:
        lines.append(f"- structure: onnx checker {structure['onnx_checker']}; initializers by type "
                     f"{structure['initializer_types']}; contrib operators {structure['contrib_ops'] or 'none'}")
    if cov:
        lines.append(f"- operator coverage: every operator has a {cov['provider']} kernel "
                     f"({sum(cov['ops'].values())} nodes, {len(cov['ops'])} operator types; table from {cov['source']})")
    return lines


def render_report(m: Manifest, published: bool) -> str:
    """Return report.md: verdict, fidelity, latency and size vs the teacher, the recipe, and the training curve."""
    lat, sizes, metrics = m.latency, m.sizes, m.metrics
    status = "published" if published else "NOT published"
    lines = [
        f"# edgedistill artifact: {m.target['name']}",
        "",
        f"**Status:** {status}. {metrics['verdict']}.",
        "",
        f"Teacher `{m.teacher['name']}` ({m.teacher['model_type']}, {m.teacher['num_layers']} layers, "
        f"{_count(m.teacher['num_parameters'])} parameters, task {m.teacher['task']}) → student with "
        f"{_plural(m.student['num_layers'], 'layer')} (from teacher layers {m.student['kept_teacher_layers']}, "
        + (f"FFN {m.student['ffn']['kept_ffn']} of {m.student['ffn']['teacher_ffn']} neurons by activation, "
           if m.student.get("ffn") else "")
        + f"{_count(m.student['num_parameters'])} parameters).",
        "",
        *[line for w in warnings_for(m) for line in ("", f"> **Warning:** {w}")],
        "",
        "## Summary vs the teacher",
        "",
        "| | teacher (torch fp32) | artifact | ratio |",
        "|---|---|---|---|",
        _latency_row(lat),
        f"| size (MB) | {sizes['teacher_weights_mb']:.2f} | {sizes['model_mb']:.2f} | {sizes['size_ratio']:.1%} |",
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
        *([] if not m.data.get("out_of_domain") else [
            "", f"`ood_*` rows: {m.data['out_of_domain']['num_texts']} out-of-domain texts, {m.data['out_of_domain']['source']}: "
            "another source, register and length than the transfer set, never trained on. They say how the artifact "
            "does beyond its transfer set; the budget is judged on the held-out split alone."]),
        "",
        "## Recipe",
        "",
        f"- export: {m.export['exporter']}" + (f", opset {m.export['opset']}" if "opset" in m.export else "")
        + f", max |exported - torch| {m.export['max_abs_diff_vs_torch']:.2e}",
        f"- graph optimization: {m.optimization['mode']}; fused operators: {m.optimization['fused_ops'] or 'none'}",
        f"- quantization: {_recipe(m.quantization['chosen'])}"
        + (f" (after {len(m.quantization['trials'])} trials; the profile asked for "
           f"{_recipe(m.quantization['profile'])})" if len(m.quantization["trials"]) > 1 else ""),
        f"- runtime: {m.target['runtime']} / {m.target['execution_provider']}, profile threads {m.target['threads']}"
        + (f" (measured with {lat['threads_measured']} on this machine)" if "not_measured" not in lat else ""),
        *coverage_lines(m),
        f"- budget: {', '.join(f'{k} {v}' for k, v in m.metrics['budget'].items())}",
        "",
        "## Distillation",
        "",
        f"Transfer set `{m.data['source']}`: {m.data['num_train']} training texts, max length {m.data['max_length']}. "
        f"Best validation fidelity {m.distillation['best_fidelity']:.4f} at step {m.distillation['best_step']}."
        + (f" Loss: the {'embedding' if m.teacher['task'] == 'feature-extraction' else 'logits'} loss and, at weight "
           f"{w:g}, the last layer's token states against the teacher's (labelled once, cached in float16)."
           if (w := m.distillation.get("token_state_weight")) else ""),
        "",
        "| step | validation fidelity | train loss |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {f:.4f} | {'—' if loss is None or loss != loss else f'{loss:.4f}'} |" for s, f, loss in m.distillation["history"]]
    trials = m.quantization["trials"]
    if len(trials) > 1:
        lines += ["", "## Quantization search", "",
                  f"The first recipe missed the budget on {min(300, m.data['num_validation'])} held-out texts; "
                  "these were tried, in order (when even the unquantized graph misses the budget, searching "
                  "quantization settings cannot help, so the search stops there):", "",
                  f"| trial | fidelity | meets budget | size MB | ms, batch {lat['batch']} × seq {lat['sequence']} |",
                  "|---|---|---|---|---|"]
        lines += [f"| {t['description']} | {t['fidelity']:.4f} | {'yes' if t['passed'] else 'no'} | {t['size_mb']:.2f} | "
                  f"{'—' if t.get('latency_ms') is None else format(t['latency_ms'], '.2f')} |" for t in trials]
    lines += ["", f"Latency: {lat['note']}", ""]
    return "\n".join(lines)


def encoder_summary_cells(m: Manifest) -> dict[str, str]:
    """Return an encoder artifact's summary cells: fidelity (with its budget and held-out count), latency, size."""
    metric = "cosine_mean" if m.teacher["task"] == "feature-extraction" else "top1_agreement"
    floor = m.metrics["budget"]["min_cosine" if metric == "cosine_mean" else "min_top1_agreement"]
    lat = m.latency
    latency = (f"not measured: {lat['not_measured']}" if "not_measured" in lat else
               f"{lat['artifact']['p50_ms']:.2f} vs {lat['teacher_torch_fp32']['p50_ms']:.2f} ms "
               f"({lat['speedup_vs_teacher']:.1f}x faster; batch {lat['batch']} × seq {lat['sequence']}, "
               f"{lat['threads_measured']} thread{'s' if lat['threads_measured'] > 1 else ''})")
    ood = m.metrics["values"].get("ood_cosine_mean")
    return {"fidelity": f"{metric} {m.metrics['values'][metric]:.4f} (budget ≥ {floor:g}, "
                        f"{m.data['num_validation']} held-out texts)"
                        + ("" if ood is None else f"; out of domain {ood:.4f}"),
            "latency": latency, "latency_short": latency_cell(lat),
            "size": f"{m.sizes['model_mb']:.2f} vs {m.sizes['teacher_weights_mb']:.2f} MB ({m.sizes['size_ratio']:.0%})"}


def render_summary(results, family) -> str:
    """Return OUT/summary.md: one row per target of a multi-target compile."""
    lines = ["# edgedistill compile summary", "",
             "| target | runtime | file | size MB (vs teacher) | latency here (speed-up) | fidelity vs teacher | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        m = r.manifest
        cells = family.summary_cells(m)
        lines.append(f"| {m.target['name']} | {m.target['runtime']} / {m.target['execution_provider']} | {m.model['file']} | "
                     f"{m.sizes['model_mb']:.2f} ({m.sizes['size_ratio']:.0%}) | {cells['latency_short']} | "
                     f"{cells['fidelity']} | {'pass' if r.published else '**FAIL**'} |")
    lines += ["", "Latency is measured on this machine"
              " (an arm64 target's numbers come from this host's CPU, not the device; a GPU target's only where a"
              " CUDA device is present)."
              " Each target's report.md has the details.", ""]
    return "\n".join(lines)
