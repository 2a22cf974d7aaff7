"""The causal-LM family's target builds: the distilled student exported with a KV cache (Optimum), quantized per the
profile (int4 escalating role by role to 8 bits until the budget holds), validated against the teacher (perplexity,
agreement, KL, greedy continuations), prefill and decoding timed against the teacher, and described by the manifest."""
from __future__ import annotations

import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from edgedistill import __version__
from edgedistill.artifact import Manifest
from edgedistill.bench.timer import measure_interleaved, paired_ratio
from edgedistill.distill.loop import resolved
from edgedistill.distill.qat import FakeQuantSpec, fake_quantized
from edgedistill.export_lm import export_causal_lm
from edgedistill.families.base import TargetBuild
from edgedistill.families.causal_lm import bytes_per_token, ffn_size
from edgedistill.families.causal_lm_stages import (
    CONTINUATION_TOKENS,
    EVAL_WINDOWS,
    GENERATION_PROMPT_TOKENS,
    MODEL_FILE,
    LMDistilled,
)
from edgedistill.progress import console, enabled
from edgedistill.quantize import quantize
from edgedistill.reverify import write_lm_validation_set
from edgedistill.runtimes.ort_lm import OrtCausalLM
from edgedistill.targets import TargetProfile
from edgedistill.teachers import Teacher
from edgedistill.teachers.hf import count_parameters
from edgedistill.validate import check_lm_budget, greedy_agreement, lm_metrics


def lm_validation(logits_of, d: LMDistilled) -> dict[str, float]:
    """Return the LM metrics of `logits_of(windows) -> logits` on the held-out windows."""
    return lm_metrics(logits_of, d.windows[d.val_idx], d.labels[d.val_idx])


# the escalation when int4 misses the budget: the roles moved to 8 bits, in order (most sensitive first)
INT8_STEPS = [("LM head at 8 bits", [r"lm_head"]),
              ("+ down_proj at 8 bits", [r"lm_head", r"down_proj|mlp/c_proj"]),
              ("+ the whole MLP at 8 bits", [r"lm_head", r"/mlp/"]),
              ("every MatMul at 8 bits", [r"MatMul"])]


def quantize_within_budget(model: Path, config, budget, d: LMDistilled, stage_dir: Path, threads: int):
    """Return the quantized model that keeps the budget with the fewest 8-bit roles, and every trial.

    Trials are scored on the held-out windows (what validation uses), so the chosen one is the validated one. When
    none keeps the budget, the most faithful is returned (and the target fails with its report)."""
    from edgedistill.quantize.configs import WeightOnlyConfig

    candidates = [("as configured", config)]
    if isinstance(config, WeightOnlyConfig) and config.bits == 4 and config.search:
        candidates += [(name, config.model_copy(update={"int8_nodes": [*config.int8_nodes, *nodes]}))
                       for name, nodes in INT8_STEPS]
    trials, best = [], None
    for i, (name, cfg) in enumerate(candidates):
        path = quantize(model, cfg, stage_dir / f"trial-{i}.onnx")
        m = lm_validation(OrtCausalLM(path, threads).logits, d)
        passed, _ = check_lm_budget(m, budget)
        trials.append({"description": name, "config": cfg.model_dump(mode="json"), "perplexity_ratio": m["perplexity_ratio"],
                       "top1_agreement": m["top1_agreement"], "size_mb": path.stat().st_size / 1e6, "passed": passed})
        if enabled():
            console.print(f"quantization trial {i}: {name}: perplexity {m['perplexity_ratio']:.3f}x the teacher's, "
                          f"top-1 {m['top1_agreement']:.4f}, {trials[-1]['size_mb']:.1f} MB"
                          + (" — keeps the budget" if passed else ""), highlight=False)
        if best is None or passed or m["perplexity_ratio"] < trials[best]["perplexity_ratio"]:
            best = i
        if passed:
            break
    final = stage_dir / MODEL_FILE
    (stage_dir / f"trial-{best}.onnx").replace(final)
    for i in range(len(trials)):
        (stage_dir / f"trial-{i}.onnx").unlink(missing_ok=True)
    trials[best]["chosen"] = True
    return final, trials


def export_opset(profile: TargetProfile) -> int:
    """Return the opset an LM is exported at: weight-only recipes store int4/uint8 blocks, whose tensor types
    (and GatherBlockQuantized) need opset 21; onnxruntime's quantizer would otherwise bump the opset of a graph
    whose ReduceMean still has opset-17 attributes, and the result does not load."""
    return max(profile.opset, 21) if profile.causal_lm.quantization.recipe == "weight-only" else profile.opset


def build_target(d: LMDistilled, profile: TargetProfile, stage_dir: Path, opts) -> TargetBuild:
    """Export with a KV cache, check, quantize per the profile, validate against the teacher, time; in stage_dir."""
    lm = profile.causal_lm
    teacher, student = d.teacher, d.trained.student.eval()
    exported = export_causal_lm(student, teacher.tokenizer, stage_dir / "export", export_opset(profile),
                                d.windows[d.val_idx[:2]])
    threads = profile.effective_threads
    model_path, trials = quantize_within_budget(exported.model, lm.quantization, lm.budget, d, stage_dir, threads)
    runner = OrtCausalLM(model_path, threads)
    metrics = lm_validation(runner.logits, d)
    rounding = None if d.fake_quant is None else FakeQuantSpec(**d.fake_quant)
    with torch.no_grad(), fake_quantized(student, rounding):  # a quantization-aware student is the rounded one
        reference = lm_validation(lambda w: student(input_ids=torch.from_numpy(w), use_cache=False).logits.float().numpy(), d)
    for k in ("perplexity", "perplexity_ratio", "top1_agreement", "kl_teacher_topk_mean"):
        metrics[f"torch_student_{k}"] = reference[k]
    ours = [list(runner.generate(p, CONTINUATION_TOKENS)) for p in d.prompts]
    metrics.update(greedy_agreement(ours, d.teacher_continuations))
    passed, verdict = check_lm_budget(metrics, lm.budget)
    latency = measure_lm_latency(teacher, runner, profile, d)
    files = {MODEL_FILE: model_path, **{p.name: p for p in exported.side_files},
             **write_lm_validation_set(stage_dir, d.windows[d.val_idx], np.asarray(d.labels[d.val_idx]))}
    manifest = lm_manifest(d, profile, exported, model_path, metrics, passed, verdict, latency, opts, trials)
    return TargetBuild(files, manifest, passed)


def measure_lm_latency(teacher: Teacher, runner: OrtCausalLM, profile: TargetProfile, d: LMDistilled) -> dict:
    """Return prefill latency (a `prompt_tokens` prompt) and per-token decode latency at that context, for the
    artifact and the teacher in torch fp32 (its own KV cache), interleaved in blocks on the same tokens and threads."""
    from transformers import DynamicCache

    lm = profile.causal_lm
    n = min(lm.prompt_tokens, teacher.max_length - 2)  # prompt + the timed token within the context
    stream = d.windows[d.val_idx].reshape(-1)
    if len(stream) < n + 1:
        stream = np.resize(stream, n + 1)
    prompt = stream[:n].astype(np.int64)[None, :]
    nxt = stream[n : n + 1].astype(np.int64)[None, :]
    _, past = runner.forward(prompt)
    previous = torch.get_num_threads()
    torch.set_num_threads(profile.effective_threads)
    try:
        with torch.inference_mode():
            t_prompt, t_next = torch.from_numpy(prompt), torch.from_numpy(nxt)
            cache = DynamicCache()
            teacher.module(input_ids=t_prompt, past_key_values=cache, use_cache=True)

            def teacher_step(_):
                teacher.module(input_ids=t_next, past_key_values=cache, use_cache=True)
                cache.crop(n)  # back to the prompt: every timed step decodes at the same context

            candidates = {"artifact_prefill": (lambda _: runner.forward(prompt), [0]),
                          "teacher_prefill": (lambda _: teacher.module(input_ids=t_prompt, use_cache=True), [0]),
                          "artifact_decode": (lambda _: runner.forward(nxt, past), [0]),
                          "teacher_decode": (teacher_step, [0])}
            stats = measure_interleaved(candidates, warmup=3, min_blocks=5, min_time_s=4.0, block_s=0.3, settle=1)
    finally:
        torch.set_num_threads(previous)
    decode = 1.0 / paired_ratio(stats["artifact_decode"].block_p50_ms, stats["teacher_decode"].block_p50_ms)
    prefill = 1.0 / paired_ratio(stats["artifact_prefill"].block_p50_ms, stats["teacher_prefill"].block_p50_ms)
    return {"batch": 1, "prompt_tokens": n, "threads_profile": profile.threads,
            "threads_measured": profile.effective_threads,
            **{k: v.as_dict() for k, v in stats.items()},
            "artifact_decode_tokens_per_s": 1000.0 / stats["artifact_decode"].p50_ms,
            "teacher_decode_tokens_per_s": 1000.0 / stats["teacher_decode"].p50_ms,
            "decode_speedup_vs_teacher": decode, "prefill_speedup_vs_teacher": prefill,
            "note": f"batch 1; prefill = one pass over a {n}-token held-out prompt; decode = one token after a {n}-token "
                    "context through the KV cache (tokens/s = 1000 / its median ms); teacher = transformers fp32 with "
                    "its DynamicCache; interleaved ~0.3 s blocks, speed-ups are medians of paired block ratios."}


def num_layers(config) -> int:
    """Return a decoder config's depth, whatever the architecture calls it."""
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


def lm_manifest(d: LMDistilled, profile: TargetProfile, exported, model_path: Path, metrics: dict, passed: bool,
                verdict: str, latency: dict, opts, trials: list[dict]) -> Manifest:
    import onnx
    import onnxruntime
    import transformers

    teacher, trained, lm = d.teacher, d.trained, profile.causal_lm
    config = trained.student.config
    model_mb = model_path.stat().st_size / 1e6
    teacher_mb = teacher.source["fp32_mb"]
    dtype = d.labels.dtype
    graph = onnx.load(str(model_path), load_external_data=False).graph
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return Manifest(
        family="causal-lm",
        edgedistill_version=__version__,
        target=profile.model_dump(mode="json"),
        teacher={"name": teacher.name, "sha256": teacher.sha256, "model_type": config.model_type, "task": teacher.task,
                 "num_layers": teacher.family.num_layers(teacher.config),
                 "num_parameters": count_parameters(teacher.module), "source": teacher.source,
                 "vocab_size": int(config.vocab_size), "context": teacher.max_length},
        student={"num_layers": num_layers(config), "ffn_size": ffn_size(config), "kept_teacher_layers": d.kept_layers,
                 "layer_selection": d.selection, "num_parameters": count_parameters(trained.student),
                 "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)), "config": config.to_diff_dict()},
        data={"source": d.data.source, "sha256": d.data.sha256, "num_texts": len(d.data), "window_tokens": d.window,
              "teacher_generated_windows": d.generated, "generation": None if not d.generated else
              {"prompt_tokens": GENERATION_PROMPT_TOKENS, "sampling": "temperature 1, full distribution",
               "tokens": d.generated * (d.window - GENERATION_PROMPT_TOKENS)},
              "num_windows": len(d.windows), "num_train": len(d.train_idx), "num_validation": len(d.val_idx),
              "train_tokens": int(len(d.train_idx) * d.window), "val_fraction": opts.val_fraction,
              "soft_labels": {"top_k": d.top_k, "bytes_per_token": bytes_per_token(dtype),
                              "fields": list(dtype.names)}},
        distillation={"config": asdict(resolved(opts.distill)), "quantization_aware": d.fake_quant,
                      "eval_windows": min(EVAL_WINDOWS, len(d.val_idx)),
                      "best_validation_perplexity": trained.best_fidelity,
                      "best_step": trained.best_step, "history": trained.history},
        export={"exporter": "optimum main_export (text-generation-with-past)", "opset": export_opset(profile),
                **exported.checks},
        optimization={"mode": "onnxruntime session optimizations (ORT_ENABLE_ALL) at load"},
        quantization={"profile": lm.quantization.model_dump(mode="json"), "operators": dict(sorted(ops.items())),
                      "chosen": next(t for t in trials if t.get("chosen"))["config"], "trials": trials},
        model={"file": MODEL_FILE, "format": "onnx", "kv_cache": {"layers": num_layers(config),
               "inputs": "past_key_values.{i}.key|value", "outputs": "present.{i}.key|value"},
               "inputs": [i.name for i in graph.input], "outputs": [o.name for o in graph.output]},
        metrics={"values": metrics, "budget": lm.budget.model_dump(), "passed": passed, "verdict": verdict},
        latency=latency,
        sizes={"model_mb": model_mb, "teacher_weights_mb": teacher_mb, "size_ratio": model_mb / teacher_mb,
               "teacher_file_mb": teacher.source.get("file_mb")},
        versions={"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                  "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "platform": platform.platform(),
                  "machine": platform.machine()},
        seed=opts.distill.seed,
    )
