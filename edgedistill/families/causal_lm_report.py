"""What a person reads about a causal-LM artifact: report.md and the CLI/summary cells."""
from __future__ import annotations

from edgedistill.artifact import Manifest


def summary_cells(m: Manifest) -> dict[str, str]:
    v, lat, lm = m.metrics["values"], m.latency, m.metrics["budget"]
    decode = (f"decode {lat['artifact_decode_tokens_per_s']:.1f} vs {lat['teacher_decode_tokens_per_s']:.1f} tok/s "
              f"({lat['decode_speedup_vs_teacher']:.1f}x); prefill {lat['artifact_prefill']['p50_ms']:.1f} vs "
              f"{lat['teacher_prefill']['p50_ms']:.1f} ms ({lat['prefill_speedup_vs_teacher']:.1f}x), "
              f"{lat['prompt_tokens']}-token prompt, {lat['threads_measured']} threads")
    return {"fidelity": f"perplexity {v['perplexity']:.2f} vs teacher {v['teacher_perplexity']:.2f} "
                        f"({v['perplexity_ratio']:.3f}x, budget ≤ {lm['max_perplexity_ratio']:g}x); top-1 agreement "
                        f"{v['top1_agreement']:.4f} (≥ {lm['min_top1_agreement']:g}); greedy agreement "
                        f"{v['greedy_token_agreement']:.2f}; {int(v['tokens']):,} held-out tokens",
            "latency": decode,
            "latency_short": f"{lat['artifact_decode_tokens_per_s']:.1f} tok/s ({lat['decode_speedup_vs_teacher']:.1f}x)",
            "size": f"{m.sizes['model_mb']:.2f} vs {m.sizes['teacher_weights_mb']:.2f} MB fp32 ({m.sizes['size_ratio']:.0%})"}


def render_report(m: Manifest, published: bool) -> str:
    """Return report.md of an LM artifact."""
    v, lat, st = m.metrics["values"], m.latency, m.student
    status = "published" if published else "REJECTED (not published)"
    q = m.quantization.get("chosen", m.quantization["profile"])
    recipe = ", ".join(f"{k} {val}" for k, val in q.items() if k != "recipe" and val not in ([], None))
    cells = summary_cells(m)
    lines = [
        f"# {m.target['name']}: {m.teacher['name']} → {st['num_layers']}-layer student", "",
        f"**Status:** {status}. {m.metrics['verdict']}.", "",
        f"Teacher `{m.teacher['name']}` ({m.teacher['model_type']}, {m.teacher['num_layers']} layers, "
        f"{m.teacher['num_parameters']:,} parameters; weights: {m.teacher['source'].get('format')}"
        + (f", dequantized to fp32 from GGUF types {m.teacher['source']['tensor_types']}" if m.teacher['source'].get('format') == 'gguf' else "")
        + (f") → student keeping layers {st['kept_teacher_layers']} (chosen by {st['layer_selection']['criterion']}; "
           if st["kept_teacher_layers"] else f") → the given student `{st['layer_selection'].get('path')}` (")
        + (f"FFN narrowed from {ffn['teacher_ffn']} to {ffn['kept_ffn']} neurons by activation; "
           if (ffn := st["layer_selection"].get("ffn")) else "")
        + f"perplexity before training {st['layer_selection']['student_perplexity_before_training']:.1f}), "
        f"{st['num_parameters']:,} parameters.", "",
        f"Distilled on {m.data['train_tokens']:,} tokens ({m.data['num_train']} windows of {m.data['window_tokens']}) "
        f"of `{m.data['source']}` against the teacher's top-{m.data['soft_labels']['top_k']} next-token "
        f"distributions ({m.data['soft_labels']['bytes_per_token']:.0f} bytes per token cached), "
        f"{m.distillation['config']['divergence']} at temperature {m.distillation['config']['lm_temperature']:g}; "
        f"best validation perplexity {m.distillation['best_validation_perplexity']:.2f} at step "
        f"{m.distillation['best_step']}."
        + (f" {m.data['teacher_generated_windows']} of the windows were written by the teacher (sampled "
           f"continuations of {m.data['generation']['prompt_tokens']}-token training prompts)."
           if m.data.get("teacher_generated_windows") else "")
        + (f" Quantization-aware: trained through {fq['bits']}-bit rounding in blocks of {fq['block_size']}"
           f"{' (embedding table included)' if fq['embeddings'] else ''}." if (fq := m.distillation.get("quantization_aware")) else ""),
        "",
        f"Quantization: {q['recipe']} ({recipe}).", "",
        "| | value |", "|---|---|",
        f"| fidelity | {cells['fidelity']} |",
        f"| latency (this machine) | {cells['latency']} |",
        f"| size | {cells['size']} |", "",
        "## Metrics on the held-out windows", "", "| metric | value |", "|---|---|",
        *[f"| {k} | {val:.4f} |" for k, val in v.items()], "",
        "## Distillation curve", "",
        f"Validation perplexity on {m.distillation.get('eval_windows', 32)} held-out windows"
        + (" (through the weight rounding)" if m.distillation.get("quantization_aware") else "")
        + "; step 0 is the student before training.", "",
        "| step | tokens | validation perplexity | train loss |", "|---|---|---|---|",
        *[f"| {step} | {step * m.distillation['config']['batch_size'] * m.data['window_tokens']:,} | {score:.2f} | "
          f"{'' if loss is None or loss != loss else f'{loss:.4f}'} |" for step, score, loss in m.distillation["history"]], "",
        "## Quantization trials (scored on the held-out windows)", "",
        "| trial | perplexity × teacher | top-1 agreement | MB | keeps budget |", "|---|---|---|---|---|",
        *[f"| {t['description']}{' **(chosen)**' if t.get('chosen') else ''} | {t['perplexity_ratio']:.3f} | "
          f"{t['top1_agreement']:.4f} | {t['size_mb']:.1f} | {'yes' if t['passed'] else 'no'} |"
          for t in m.quantization.get("trials", [])], "",
        "## Export checks", "", "| check | value |", "|---|---|",
        *[f"| {k} | {val} |" for k, val in m.export.items()], "",
        f"Latency: {lat['note']}", "",
        "Run it: `edgedistill generate <this directory> --prompt \"...\"`.", "",
    ]
    return "\n".join(lines)
