"""The harness for causal-LM artifacts: the teacher (transformers fp32, its own KV cache), the peer path (the teacher
exported by Optimum with its KV cache and quantized int4 by onnxruntime's MatMulNBitsQuantizer, block 32, symmetric,
accuracy level 4, embeddings left fp32: what a user gets without distillation) and each artifact, in one run on the
same prompt and threads: prefill of a held-out prompt and a greedy generation, interleaved; peak RSS of a fresh
process per model; size; held-out perplexity and top-1 agreement against the teacher on the windows the artifact
carries (which its compile never trained on). Results use the same schema as encoder benches (BenchResult)."""
from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from edgedistill.artifact import verify_files
from edgedistill.bench.results import BenchResult, ModelResult, ShapeLatency
from edgedistill.bench.timer import LatencyStats, measure_interleaved, paired_ratio
from edgedistill.cache import cache_key, default_cache_dir
from edgedistill.errors import EdgeDistillError
from edgedistill.progress import console, enabled
from edgedistill.runtimes.ort_lm import OrtCausalLM
from edgedistill.validate import lm_metrics

PEER = "Optimum text-generation-with-past + MatMulNBitsQuantizer int4 (block 32, symmetric, accuracy level 4)"


def peer_model(teacher, cache_dir: Path) -> Path:
    """Return the peer-path int4 model of the teacher, exported once and cached by the teacher's sha256."""
    from edgedistill.export_lm import export_causal_lm
    from edgedistill.quantize import quantize
    from edgedistill.quantize.configs import WeightOnlyConfig

    root = cache_dir / "peers" / cache_key("peer-int4-v1", teacher.sha256)
    final = root / "model-int4.onnx"
    if final.is_file():
        return final
    windows = np.arange(64, dtype=np.int64).reshape(2, 32) % int(teacher.config.vocab_size)
    exported = export_causal_lm(teacher.module, teacher.tokenizer, root / "export", 21, windows)
    tmp = root / ".model-int4.onnx.tmp"
    quantize(exported.model, WeightOnlyConfig(bits=4, block_size=32, symmetric=True, accuracy_level=4,
                                              quantize_embeddings=False), tmp)
    os.replace(tmp, final)
    return final


def _latency(stats: LatencyStats, phase: str, sequence: int, threads: int, tokens: int) -> ShapeLatency:
    return ShapeLatency(phase=phase, batch=1, sequence=sequence, threads=threads, p50_ms=stats.p50_ms,
                        p90_ms=stats.p90_ms, p99_ms=stats.p99_ms, mean_ms=stats.mean_ms, stdev_ms=stats.stdev_ms,
                        runs=stats.runs, throughput_items_s=tokens / (stats.p50_ms / 1e3), samples_ms=stats.samples_ms)


def peak_rss_mb(kind: str, target: str, threads: int, prompt_tokens: int, new_tokens: int) -> float:
    """Return the peak RSS (VmHWM) of a fresh process that loads one model and generates once."""
    out = subprocess.run([sys.executable, "-m", "edgedistill.bench.lm", kind, target, str(threads), str(prompt_tokens),
                          str(new_tokens)], capture_output=True, text=True, env={**os.environ, "EDGEDISTILL_QUIET": "1"})
    if out.returncode != 0:
        raise RuntimeError((out.stderr.strip().splitlines() or ["the probe failed"])[-1][:200])
    return float(out.stdout.strip().splitlines()[-1])


def run_lm_bench(artifact_dirs: list[Path], teacher_spec: str | None, threads: int | None, prompt_tokens: int,
                 new_tokens: int, held_out_windows: int, min_time_s: float, memory: bool = True,
                 peer: bool = True, cache_dir: Path | None = None) -> BenchResult:
    """Measure causal-LM artifacts against their teacher and the peer path."""
    from edgedistill.export_lm import torch_greedy
    from edgedistill.teachers import load_teacher

    manifests = {d: verify_files(d) for d in artifact_dirs}
    names = {m.teacher["name"] for m in manifests.values()}
    if teacher_spec is None and len(names) > 1:
        raise EdgeDistillError(f"the artifacts come from different teachers ({', '.join(sorted(names))})",
                               hint="bench one teacher's artifacts at a time, or pass --teacher")
    teacher = load_teacher(teacher_spec or names.pop(), "text-generation")
    first = next(iter(manifests))
    windows = np.load(first / "validation-windows.npy", allow_pickle=False)[:held_out_windows]
    labels = np.load(first / "validation-teacher.npy", allow_pickle=False)[:held_out_windows]
    stream = windows.reshape(-1)
    if len(stream) < prompt_tokens:
        raise EdgeDistillError(f"the artifact carries {len(stream)} held-out tokens, fewer than a {prompt_tokens}-token prompt",
                               hint="pass a shorter --seq")
    threads = min(threads or min(m.target["threads"] for m in manifests.values()), os.cpu_count() or 1)
    torch.set_num_threads(threads)
    prompt = stream[:prompt_tokens].tolist()
    t_prompt = torch.tensor([prompt])
    teacher_ppl = float(np.exp(-np.nanmean(labels["target"][:, :-1].astype(np.float64))))
    results = [ModelResult(name=f"teacher ({Path(teacher.name).name})", role="teacher", runtime="torch-cpu",
                           model_size_mb=teacher.source["fp32_mb"], accuracy={"perplexity": teacher_ppl},
                           runtime_settings={"torch": torch.__version__, "intra_op_threads": threads})]
    candidates = {"0": ((lambda _: torch_greedy(teacher.module, prompt, new_tokens)),
                        (lambda _: teacher.module(input_ids=t_prompt, use_cache=True)))}
    onnx_models = []
    if peer:
        onnx_models.append(("peer", "peer: teacher int4 (no distillation)", peer_model(teacher, cache_dir or default_cache_dir()), None))
    onnx_models += [("artifact", m.target["name"], d / m.model["file"], d) for d, m in manifests.items()]
    for role, name, path, artifact_dir in onnx_models:
        lm = OrtCausalLM(path, threads)
        r = ModelResult(name=name, role=role, runtime="ort-cpu", artifact_dir=str(artifact_dir) if artifact_dir else None,
                        model_file=path.name, model_size_mb=path.stat().st_size / 1e6,
                        runtime_settings={"intra_op_threads": threads, "kv_cache": True},
                        notes=[PEER] if role == "peer" else [])
        metrics = lm_metrics(lm.logits, windows, labels)
        r.accuracy = {k: metrics[k] for k in ("perplexity", "perplexity_ratio", "top1_agreement", "kl_teacher_topk_mean")}
        candidates[str(len(results))] = ((lambda lm: lambda _: list(lm.generate(prompt, new_tokens)))(lm),
                                         (lambda lm: lambda _: lm.forward(np.asarray([prompt])))(lm))
        results.append(r)
    if enabled():
        console.print(f"timing {len(results)} models: a {prompt_tokens}-token prompt, {new_tokens} greedy tokens, "
                      f"{threads} threads, interleaved, ≥{min_time_s:g} s")
    with torch.inference_mode():
        timed = {f"{i}:generate": (gen, [0]) for i, (gen, _) in candidates.items()}
        timed.update({f"{i}:prefill": (pre, [0]) for i, (_, pre) in candidates.items()})
        stats = measure_interleaved(timed, warmup=1, min_blocks=3, min_time_s=min_time_s, block_s=0.0, settle=0)
    for i, r in enumerate(results):
        gen, pre = stats[f"{i}:generate"], stats[f"{i}:prefill"]
        r.latency = [_latency(pre, "prefill", prompt_tokens, threads, prompt_tokens),
                     _latency(gen, "generate", new_tokens, threads, new_tokens)]
        r.ratio_to_teacher = {r.latency[0].key: paired_ratio(pre.block_p50_ms, stats["0:prefill"].block_p50_ms),
                              r.latency[1].key: paired_ratio(gen.block_p50_ms, stats["0:generate"].block_p50_ms)}
        decode_s = max((gen.p50_ms - pre.p50_ms) / 1e3, 1e-9)
        r.accuracy["decode_tokens_per_s"] = new_tokens / decode_s  # generation minus its prefill
    if memory:
        for r, (kind, target) in zip(results, [("torch", teacher.name)] + [("ort", str(p)) for _, _, p, _ in onnx_models]):
            try:
                r.peak_rss_mb = peak_rss_mb(kind, target, threads, prompt_tokens, new_tokens)
            except RuntimeError as e:
                r.notes.append(f"peak memory not measured: {e}")
    return BenchResult(
        created_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        machine={"platform": platform.platform(), "machine": platform.machine(), "cores": os.cpu_count()},
        teacher={"name": teacher.name, "sha256": teacher.sha256, "task": teacher.task, "source": teacher.source},
        data={"source": f"{first}/validation-windows.npy", "num_windows": int(len(windows)),
              "window_tokens": int(windows.shape[1])},
        settings={"threads": threads, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                  "min_time_s": min_time_s, "timing": "interleaved blocks of 3 calls, no settle calls (each call is "
                  "a whole prefill or generation); ratio_to_teacher = median of paired block-median ratios; "
                  "decode_tokens_per_s = new tokens / (generation p50 - prefill p50)",
                  "memory_probe": "fresh process per model, one generation" if memory else None},
        results=results,
    )


def _probe(kind: str, target: str, threads: int, prompt_tokens: int, new_tokens: int) -> None:
    torch.set_num_threads(threads)
    prompt = [(17 * i) % 1000 + 10 for i in range(prompt_tokens)]
    if kind == "torch":
        from edgedistill.export_lm import torch_greedy
        from edgedistill.teachers import load_teacher

        torch_greedy(load_teacher(target, "text-generation").module, prompt, new_tokens)
    else:
        list(OrtCausalLM(Path(target), threads).generate(prompt, new_tokens))
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            sys.stdout.write(f"{float(line.split()[1]) / 1024}\n")


if __name__ == "__main__":
    _probe(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
