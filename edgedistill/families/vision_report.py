"""What a person reads about an image-classifier artifact: report.md and the CLI/summary cells."""
from __future__ import annotations

from edgedistill.artifact import Manifest
from edgedistill.report import coverage_lines, latency_cell


def summary_cells(m: Manifest) -> dict[str, str]:
    v, lat, budget = m.metrics["values"], m.latency, m.metrics["budget"]
    if "not_measured" in lat:
        latency = f"not measured: {lat['not_measured']} (batch {lat['batch']})"
    else:
        latency = (f"{lat['artifact']['p50_ms']:.2f} vs {lat['teacher']['p50_ms']:.2f} ms ({lat['speedup_vs_teacher']:.1f}x), "
                   f"batch {lat['batch']}, {lat['threads_measured']} threads")
    interval = (f", 95% interval over the held-out photos {v['top1_agreement_low95']:.2f}–{v['top1_agreement_high95']:.2f}"
                if "top1_agreement_low95" in v else "")
    return {"fidelity": f"top-1 agreement {v['top1_agreement']:.4f} (budget ≥ {budget['min_top1_agreement']:g}{interval}); top-5 "
                        f"{v['top5_agreement']:.4f}; KL {v['kl_teacher']:.4f}; {m.data['num_validation']} held-out views "
                        f"of {m.data['num_validation_images']} photos"
                        + ("" if m.data.get("photos_held_out", True) else " (other crops of the training photos)"),
            "latency": latency,
            "latency_short": latency_cell(lat) if "not_measured" in lat else
                             f"{lat['artifact']['p50_ms']:.2f} ms ({lat['speedup_vs_teacher']:.1f}x)",
            "size": f"{m.sizes['model_mb']:.2f} vs {m.sizes['teacher_weights_mb']:.2f} MB fp32 ({m.sizes['size_ratio']:.0%})"}


def rounding_text(r: dict | None) -> str:
    """Return how the int8 weights were rounded, for the report's quantization line."""
    if not r or not r.get("layers"):
        return "" if not r or "why" not in r else f"; weights rounded to nearest ({r['why']})"
    return (f"; weights rounded by GPTQ with bias correction through the int8 simulation ({r['layers']} layers, "
            f"H from {r['views']} training views, {r['seconds']:.0f} s)")


def render_report(m: Manifest, published: bool) -> str:
    """Return report.md of a vision artifact."""
    v, st, d = m.metrics["values"], m.student, m.data
    status = "published" if published else "REJECTED (not published)"
    p = st["pruning"]
    cells = summary_cells(m)
    q = m.quantization["chosen"]
    qat = m.distillation.get("quantization_aware")
    if not m.distillation["history"]:
        trained = (f"Not distilled: {p.get('not_distilled', p.get('importance'))}; calibrated on views of "
                   f"{d['num_train_images']} photos of `{d['source']}`. Views: {d['views']}.")
    else:
        trained = (f"Distilled on {d['num_train']:,} views ({d['views_per_train_image']} per photo) of "
                   f"{d['num_train_images']} photos of `{d['source']}` against the teacher's cached logits, temperature "
                   f"{m.distillation['config']['temperature']:g}" + (", with labels" if d["labels"] else "")
                   + (f", quantization-aware (through {qat['simulated']}; ranges from {qat['calibration_views']} "
                      "calibration views)" if qat else "")
                   + f"; best validation top-1 agreement {m.distillation['best_validation_top1_agreement']:.4f} at step "
                   f"{m.distillation['best_step']}. Views: {d['views']}.")
    lines = [
        f"# {m.target['name']}: {m.teacher['name']} → student at {p['macs_ratio']:.0%} of its MACs", "",
        f"**Status:** {status}. {m.metrics['verdict']}.", "",
        f"Teacher `{m.teacher['name']}` ({m.teacher['num_parameters']:,} parameters, {p['teacher_macs'] / 1e6:.0f}M MACs "
        f"at {d['image_size']}×{d['image_size']}) → student "
        + (f"that resizes its {d['image_size']}-pixel input to {p['resolution']}×{p['resolution']} inside the graph, "
           if p.get("resolution", d["image_size"]) < d["image_size"] else "")
        + (f"pruned channel-wise ({p.get('importance', 'none')}, channel ratio {p['channel_ratio']})" if p["channel_ratio"]
           else "with the teacher's layers (no channel pruned)")
        + f", {p['student_macs'] / 1e6:.0f}M MACs, {st['num_parameters']:,} parameters.", "",
        trained, "",
        f"Quantization: {q.get('recipe')} ({', '.join(f'{k} {val}' for k, val in q.items() if k != 'recipe' and val not in ([], None))})"
        f"{rounding_text(m.quantization.get('weight_rounding'))}.", "",
        "| | value |", "|---|---|",
        f"| fidelity | {cells['fidelity']} |",
        f"| latency (this machine) | {cells['latency']} |",
        f"| size | {cells['size']} |", "",
        *([f"Fidelity was computed with {m.model['validated_with']}; latency was not measured "
           f"({m.latency['not_measured']}).", ""] if "validated_with" in m.model else []),
        *([*coverage_lines(m), ""] if coverage_lines(m) else []),
        "## Metrics on the held-out views", "", "| metric | value |", "|---|---|",
        *[f"| {k} | {val:.4f} |" for k, val in v.items()], "",
        "## Distillation curve", "", "| step | validation top-1 agreement | train loss |", "|---|---|---|",
        *[f"| {step} | {score:.4f} | {'' if loss is None or loss != loss else f'{loss:.4f}'} |"
          for step, score, loss in m.distillation["history"]], "",
        f"## Quantization trials (scored on {m.quantization.get('search_views', 'held-out views')})", "",
        *(["Each sensitivity probe quantizes one group alone and reads KL(teacher ‖ probe) on up to 128 of these "
            "views; groups then go to float in order of that KL per byte of float weights they keep.", ""]
          if any(t["description"].startswith("sensitivity probe") for t in m.quantization["trials"]) else []),
        *([f"A trial is kept when its top-1 agreement on these views reaches {m.quantization['search_floor']:.4f}: the "
           "budget plus one standard error of a share measured on them, so that it holds on the held-out photos too.",
           ""] if "search_floor" in m.quantization else []),
        "| trial | top-1 agreement | MB | meets the search's floor |", "|---|---|---|---|",
        *[f"| {t['description']} | {_trial_score(t)} | {t['size_mb']:.2f} | {'yes' if t['passed'] else 'no'} |"
          for t in m.quantization["trials"]], "",
        f"Input: {m.model['input']}. Latency: {m.latency['note']}", "",
    ]
    return "\n".join(lines)


def _trial_score(t: dict) -> str:
    """A trial's top-1 agreement, or a sensitivity probe's KL (it ranks groups; it is no candidate)."""
    return f"KL {t['fidelity']:.4f}" if t["description"].startswith("sensitivity probe (error)") else f"{t['fidelity']:.4f}"
