"""`edgedistill bench`: latency, memory and fidelity of artifacts against their teacher, measured in one run."""
from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgedistill.artifact import Manifest, verify_files
from edgedistill.bench.memory import measure_peak_rss
from edgedistill.bench.results import BenchResult, ModelResult, ShapeLatency, shape_key
from edgedistill.bench.timer import LatencyStats, measure_interleaved, paired_ratio, summarize
from edgedistill.data import BUILTIN_SETS, builtin_texts, load_transfer_set
from edgedistill.errors import ArtifactError, EdgeDistillError
from edgedistill.progress import console, enabled
from edgedistill.runtimes import predict_with
from edgedistill.runtimes.registry import RUNTIMES, native_runtime
from edgedistill.targets import cpu_flags
from edgedistill.teachers import Teacher, load_teacher
from edgedistill.teachers.hf import weights_mb
from edgedistill.validate import fidelity_metrics, retrieval_agreement

TEACHER_RUNTIME = "torch"


@dataclass
class BenchSettings:
    """What to measure. threads None: the smallest profile thread count among the artifacts, capped at the cores."""

    runtimes: list[str] | None = None  # None: each artifact in its own target's runtime (native_runtime)
    threads: int | None = None
    batches: list[int] = field(default_factory=lambda: [1, 8])
    sequence: int = 128
    held_out: int = 500
    min_time_s: float = 3.0
    rounds: int = 5  # timing rounds per shape; ratio_to_teacher is the median of the rounds' paired ratios
    retrieval_k: int = 10
    memory: bool = True
    new_tokens: int = 64  # language models: tokens a generation is timed over (the prompt is `sequence` tokens)
    peer: bool = True  # language models: also time the teacher int4 without distillation (Optimum + MatMulNBits)


def _check_runtimes(names: list[str]) -> list[str]:
    known = [*RUNTIMES, TEACHER_RUNTIME]
    for n in names:
        if n not in known:
            raise EdgeDistillError(f"unknown runtime '{n}'", hint=f"use one of: {', '.join(known)}")
    return [n for n in names if n != TEACHER_RUNTIME]  # the teacher always runs in torch


def _teacher_for(manifests: dict[Path, Manifest], teacher_spec: str | None) -> Teacher:
    shas = {m.teacher["sha256"] for m in manifests.values()}
    if len(shas) > 1:
        raise ArtifactError("the artifacts come from different teachers", hint="bench artifacts of one teacher at a time")
    spec = teacher_spec or next(iter(manifests.values())).teacher["name"]
    try:
        teacher = load_teacher(spec)
    except EdgeDistillError as e:
        if teacher_spec is None:
            raise ArtifactError(f"cannot load the teacher recorded in the manifest ({spec}): {e.message}",
                                hint="pass --teacher PATH") from None
        raise
    if teacher.sha256 not in shas:
        raise ArtifactError(f"teacher {spec} is not the one the artifacts were compiled from (sha256 differs)",
                            hint="pass the --teacher the artifacts were compiled from")
    return teacher


def _held_out(manifests: dict[Path, Manifest], data_path: str | None, teacher: Teacher, n: int):
    if data_path is not None:
        data = load_transfer_set(data_path, label_names=teacher.label_names)
        source = data.source
        if data.sha256 in {m.data["sha256"] for m in manifests.values()}:
            source += " (WARNING: the compile's own transfer set: fidelity is measured partly on training texts)"
            if enabled():
                console.print(f"[yellow]warning:[/] {data_path} is the transfer set the artifact was distilled on; "
                              "its fidelity there overstates held-out fidelity")
        labels = np.asarray(data.labels)[:n] if data.labels is not None else None
        return source, data.texts[:n], labels
    # the built-in set the compiles used (the family's own when they used a file), after the part they trained and
    # validated on
    sources = {m.data["source"] for m in manifests.values()} & set(BUILTIN_SETS)
    name = sorted(sources)[0] if sources else teacher.family.builtin_data
    used = max((m.data["num_texts"] for m in manifests.values() if m.data["source"] == name), default=0)
    return f"{name}[{used}:{used + n}]", builtin_texts(name, used + n)[used:], None


def shape_latency(stats: LatencyStats, batch: int, seq: int, threads: int) -> ShapeLatency:
    summary = {k: v for k, v in vars(stats).items() if k not in ("samples_ms", "block_p50_ms")}
    return ShapeLatency(batch=batch, sequence=seq, threads=threads, **summary,
                        throughput_items_s=batch * 1000.0 / stats.mean_ms, samples_ms=[round(x, 4) for x in stats.samples_ms])


def run_bench(artifact_dirs: list[Path], teacher_spec: str | None, data_path: str | None,
              settings: BenchSettings) -> BenchResult:
    """Measure every artifact on every runtime and the teacher in torch, on the same inputs and threads."""
    runtimes = None if settings.runtimes is None else _check_runtimes(settings.runtimes)
    if not artifact_dirs:
        raise EdgeDistillError("no artifact directories given", hint="pass one or more OUT/<target> directories")
    manifests = {d: verify_files(d) for d in artifact_dirs}
    families = {m.family for m in manifests.values()}
    if len(families) > 1:
        raise EdgeDistillError(f"the artifacts are of different model families ({', '.join(sorted(families))})",
                               hint="bench one family's artifacts at a time")
    if families == {"causal-lm"}:
        from edgedistill.bench.lm import run_lm_bench

        sequence = 128 if settings.sequence is None else settings.sequence
        return run_lm_bench(artifact_dirs, teacher_spec, settings.threads, sequence, settings.new_tokens,
                            max(2, settings.held_out // 16), settings.min_time_s, settings.memory, settings.peer)
    if families == {"vision"}:
        from edgedistill.bench.vision import run_vision_bench

        for flag, value in (("--data", data_path), ("--runtime", settings.runtimes)):
            if value:
                raise EdgeDistillError(f"{flag}: image classifiers are measured on the held-out views their artifact "
                                       "carries, each in its own target's runtime", hint=f"leave out {flag}")
        return run_vision_bench(artifact_dirs, teacher_spec, settings.threads, settings.batches, settings.min_time_s,
                                settings.rounds, settings.peer, settings.memory)
    teacher = _teacher_for(manifests, teacher_spec)
    source, texts, labels = _held_out(manifests, data_path, teacher, settings.held_out)
    if len(texts) < 2:
        raise EdgeDistillError(f"{source} gives {len(texts)} held-out text(s); bench needs at least 2", hint="pass a larger --data")
    limit = getattr(teacher.config, "max_position_embeddings", None)
    if limit is not None and settings.sequence > limit:
        raise EdgeDistillError(f"--seq {settings.sequence} exceeds the teacher's {limit} positions", hint=f"pass --seq {limit} or less")
    threads = settings.threads or min(m.target["threads"] for m in manifests.values())
    threads = min(threads, os.cpu_count() or 1)
    tok, names, seq, task = teacher.tokenizer, teacher.family.input_names(teacher.tokenizer), settings.sequence, teacher.task
    torch.set_num_threads(threads)

    def teacher_run(feeds):
        with torch.inference_mode():
            return teacher.module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()

    teacher_out = predict_with(teacher_run, tok, texts, names, seq)
    results = [ModelResult(name=f"teacher ({Path(teacher.name).name})", role="teacher", runtime=TEACHER_RUNTIME,
                           model_size_mb=weights_mb(teacher.path), runtime_settings={"torch": torch.__version__,
                                                                                  "intra_op_threads": threads})]
    runners = {0: teacher_run}
    for d, m in manifests.items():
        for rt_name in runtimes if runtimes is not None else [native_runtime(m.target)]:
            rt = RUNTIMES[rt_name]
            model = rt.model_file(d, list(m.files))
            r = ModelResult(name=artifact_label(d, m, manifests), role="artifact", runtime=rt_name, artifact_dir=str(d))
            reason = (f"{d} has no *{rt.model_suffix} model file" if model is None else rt.unavailable_reason())
            if reason is None:
                try:
                    run, r.runtime_settings = rt.load(model, threads)
                except Exception as e:  # a provider that is listed but cannot start (no device)
                    reason = str(e).splitlines()[0]
            if reason is not None:
                r.status, r.reason = "not measured", reason
                results.append(r)
                continue
            r.model_file, r.model_size_mb = model.name, model.stat().st_size / 1e6
            fixed = r.runtime_settings.get("fixed_input_shape")
            out = predict_with(run, tok, texts, names, seq, tuple(fixed) if fixed and None not in fixed else None)
            r.accuracy = fidelity_metrics(out, teacher_out, task, labels)
            if task == "feature-extraction":
                r.accuracy[f"retrieval_agreement_at_{settings.retrieval_k}"] = retrieval_agreement(out, teacher_out, settings.retrieval_k)
            runners[len(results)] = run
            results.append(r)

    for batch in settings.batches:
        inputs = []
        for i in range(8):  # 8 rotating batches of real text padded to the sequence length
            chunk = [texts[(i * batch + j) % len(texts)] for j in range(batch)]
            enc = tok(chunk, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
            inputs.append({k: enc[k].astype(np.int64) for k in names})
        if enabled():
            console.print(f"timing batch {batch} × seq {seq}, {threads} threads, {len(runners)} models interleaved, "
                          f"≥{settings.min_time_s:g} s")
        timed = {}
        for i, fn in runners.items():
            fixed = results[i].runtime_settings.get("fixed_input_shape", [None, None])
            if any(f is not None and f != want for f, want in zip(fixed, (batch, seq))):
                results[i].notes.append(f"{shape_key(batch, seq, threads)} not measured: the model's input shape is "
                                        f"fixed at {fixed[0]}×{fixed[1]}")
            else:
                timed[i] = fn
        # rounds of interleaved timing: one round's ratio drifts with the machine's state (20 unchanged runs at 2
        # threads spread 1.48x); the median of several is what the gate compares (benchmarks/gate_noise.py)
        rounds = [measure_interleaved({str(i): (fn, inputs) for i, fn in timed.items()}, min_time_s=settings.min_time_s)
                  for _ in range(settings.rounds)]
        for i in timed:
            merged = summarize([x for stats in rounds for x in stats[str(i)].samples_ms])
            lat = shape_latency(merged, batch, seq, threads)
            results[i].latency.append(lat)
            per_round = [paired_ratio(stats[str(i)].block_p50_ms, stats["0"].block_p50_ms) for stats in rounds]
            results[i].ratio_to_teacher[lat.key] = statistics.median(per_round)
            if i:
                results[i].ratio_rounds[lat.key] = [round(r, 4) for r in per_round]

    if settings.memory:
        probe_batch = settings.batches[0]
        for i, r in enumerate(results):
            if i not in runners:
                continue
            if r.role == "artifact" and not getattr(RUNTIMES[r.runtime], "rss_in_process", True):
                r.notes.append("peak memory not measured: the model runs in the browser's processes, not in a probe process")
                continue
            kind, target = ("teacher", str(teacher.path)) if r.role == "teacher" else ("onnx", str(Path(r.artifact_dir) / r.model_file))
            fixed = r.runtime_settings.get("fixed_input_shape", [None, None])
            try:
                mem = measure_peak_rss(kind, target, threads, fixed[0] or probe_batch, fixed[1] or seq,
                                       int(teacher.config.vocab_size),
                                       runtime=r.runtime if r.role == "artifact" else "ort-cpu")
            except RuntimeError as e:
                r.notes.append(f"peak memory not measured: {e}")
                continue
            r.peak_rss_mb, r.rss_growth_mb = mem["peak_rss_mb"], mem["peak_rss_mb"] - mem["rss_after_imports_mb"]

    return BenchResult(
        created_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        machine={"platform": platform.platform(), "machine": platform.machine(), "processor": _cpu_name(),
                 "cpu_isa": sorted(cpu_flags() & ISA_FLAGS),
                 "cores": os.cpu_count()},
        teacher={"name": teacher.name, "sha256": teacher.sha256, "task": task},
        data={"source": source, "num_texts": len(texts), "labelled": labels is not None},
        settings={"threads": threads, "batches": settings.batches, "sequence": seq, "min_time_s_per_shape": settings.min_time_s,
                  "rounds": settings.rounds,
                  "timing": "interleaved ~0.2 s blocks, 2 untimed calls each; ratio_to_teacher = median over rounds "
                            "of each round's median of paired block-median ratios",
                  "warmup_runs": 5, "rotating_inputs": 8,
                  "memory_probe": f"fresh process, batch {settings.batches[0]}, 20 runs" if settings.memory else None},
        results=results,
    )


# the instruction sets an int8 kernel's speed turns on: an artifact/teacher ratio measured with VNNI is not one without
ISA_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "asimddp", "i8mm"}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def artifact_label(d: Path, m, manifests: dict) -> str:
    """Return an artifact's row name: its target's name, or, when several benched artifacts share that target, the
    target with the artifact's folder and its parent (build/a/x86-64-avx512 vs build/b/x86-64-avx512)."""
    name = m.target["name"]
    if sum(other.target["name"] == name for other in manifests.values()) < 2:
        return name
    return f"{name} ({Path(d).parent.name}/{Path(d).name})"
