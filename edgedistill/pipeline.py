"""compile(): teacher -> student -> distill -> export -> optimize -> quantize -> validate -> artifact, per target."""
from __future__ import annotations

import contextlib
import copy
import json
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgedistill import __version__, distributed, progress, runs
from edgedistill.artifact import Manifest, write_artifact
from edgedistill.backends import BuildContext, Built, build_model
from edgedistill.bench.timer import measure_interleaved, paired_ratio
from edgedistill.cache import (
    LabelStore,
    Rows,
    cache_key,
    default_cache_dir,
    label_sharded,
)
from edgedistill.data import TransferSet, load_transfer_set, split_indices
from edgedistill.distill.loop import (
    Checkpointing,
    DistillConfig,
    DistillResult,
    distill,
)
from edgedistill.distill.stage import load_stage, save_stage
from edgedistill.errors import DataError, EdgeDistillError, ProfileError
from edgedistill.families.text_encoder import EncoderWithHead, Task
from edgedistill.progress import new_progress
from edgedistill.report import render_report, render_summary
from edgedistill.reverify import write_validation_set
from edgedistill.runs import RUN_DIR
from edgedistill.runtimes import iter_batches, predict_with, torch_cpu
from edgedistill.targets import TargetProfile, resolve_target
from edgedistill.teachers import Teacher, load_teacher
from edgedistill.teachers.hf import count_parameters, weights_mb
from edgedistill.validate import fidelity_metrics, primary_metric, validate

SUMMARY = "summary.md"
SEARCH_TEXTS = 300  # held-out texts each quantization trial is scored on (the final validation uses all)


@dataclass
class CompileOptions:
    """Everything `compile` needs besides teacher, data, targets and output directory."""

    task: Task | None = None
    student_layers: int | None = None
    max_length: int | None = None
    val_fraction: float = 0.05
    max_texts: int | None = None
    text_column: str = "text"
    label_column: str = "label"
    cache_dir: Path | None = None
    checkpoint_every: int = 200
    resume: bool = False
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_json(self) -> dict:
        d = asdict(self)
        d["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        return d

    @classmethod
    def from_json(cls, d: dict) -> CompileOptions:
        d = dict(d)
        d["distill"] = DistillConfig(**d["distill"])
        d["cache_dir"] = None if d.get("cache_dir") is None else Path(d["cache_dir"])
        return cls(**d)


@dataclass
class TargetResult:
    """The outcome for one target: where the artifact (or the rejected report) is, and its manifest."""

    profile: TargetProfile
    published: bool
    path: Path
    manifest: Manifest


@dataclass
class CompileResult:
    """The distilled torch student (before export) and one result per target."""

    student: EncoderWithHead
    targets: list[TargetResult]


@dataclass
class Distilled:
    """What every target is built from: the trained student and the held-out split with its reference outputs."""

    teacher: Teacher
    data: TransferSet
    trained: DistillResult
    kept_layers: list[int]
    input_names: list[str]
    max_length: int
    train_idx: np.ndarray
    val_idx: np.ndarray
    val_teacher: np.ndarray  # teacher outputs on the held-out split
    val_student: np.ndarray  # fp32 torch student outputs on the held-out split

    @property
    def val_texts(self) -> list[str]:
        return [self.data.texts[i] for i in self.val_idx]

    @property
    def val_labels(self) -> np.ndarray | None:
        return None if self.data.labels is None else np.asarray(self.data.labels)[self.val_idx]


def compile(teacher_spec: str | None, data_path: str | None, target_specs: list[str], out_dir: Path,
            opts: CompileOptions) -> CompileResult:
    """Compile the teacher into one artifact per target under out_dir/<target>/.

    Under `accelerate launch` every process runs this: they share labelling and training, and the main process
    alone builds and writes the artifacts (the others return no targets). `opts.resume` continues the distillation
    of a killed run from its last checkpoint in out_dir.
    """
    profiles = resolve_targets(target_specs)  # fail fast: bad profiles, unwritable output, before any work
    check_writable(out_dir, "--out")
    check_writable(opts.cache_dir or default_cache_dir(), "--cache-dir")
    with runs.run_lock(out_dir) if distributed.is_main() else contextlib.nullcontext():
        teacher = load_teacher(teacher_spec, opts.task)
        num_layers = student_depth(teacher, opts.student_layers)
        max_length = check_max_length(teacher, opts.max_length or teacher.max_length)
        data = load_transfer_set(data_path, opts.text_column, opts.label_column, teacher.label_names, opts.max_texts)
        if distributed.is_main():
            if not opts.resume and (out_dir / RUN_DIR / "checkpoint").is_dir():
                progress.console.print(f"note: {out_dir} holds a checkpoint of an interrupted compile; starting over "
                                       f"(`edgedistill compile --resume {out_dir}` would have continued it)")
            runs.save_run(out_dir, teacher_spec, data_path, target_specs, opts.to_json())
        try:
            distilled = distill_student(teacher, data, num_layers, max_length, opts, run_dir=out_dir / RUN_DIR)
        except EdgeDistillError:  # a user error, not a kill: no checkpoint worth resuming from is left behind
            if distributed.is_main() and not (out_dir / RUN_DIR / "checkpoint").is_dir():
                shutil.rmtree(out_dir / RUN_DIR, ignore_errors=True)
            raise
        if not distributed.is_main():
            return CompileResult(distilled.trained.student, [])
        with tempfile.TemporaryDirectory(prefix=".edgedistill-work-", dir=out_dir) as work:
            results = [build_target(distilled, profile, Path(work) / profile.name, out_dir, opts) for profile in profiles]
        if len(results) > 1:
            (out_dir / SUMMARY).write_text(render_summary(results), encoding="utf-8")
        shutil.rmtree(out_dir / RUN_DIR, ignore_errors=True)  # finished: nothing to resume (the student is cached)
        return CompileResult(distilled.trained.student, results)


def load_run(out_dir: Path) -> tuple[str | None, str | None, list[str], CompileOptions]:
    """Return the arguments of the compile that wrote out_dir, set to resume from its checkpoint."""
    teacher, data, targets, opts = runs.load_run(out_dir, CompileOptions.from_json)
    opts.resume = True
    return teacher, data, targets, opts


def resolve_targets(specs: list[str]) -> list[TargetProfile]:
    """Return the profiles for --target values (this CPU's when none), refusing two targets of one name."""
    profiles = [resolve_target(s) for s in (specs or [None])]
    names = [p.name for p in profiles]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ProfileError(f"two --target profiles are named {', '.join(dupes)}; each target needs its own OUT/<name>",
                           hint="give each profile a distinct `name:`")
    return profiles


def check_writable(path: Path, option: str) -> None:
    """Create `path` if needed and prove a file can be written there, or raise EdgeDistillError naming the option."""
    if path.exists() and not path.is_dir():
        raise EdgeDistillError(f"{option} {path} is a file, not a directory", hint=f"pass a directory to {option}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise EdgeDistillError(f"cannot write to {option} {path}: {e.strerror}", hint=f"pass a writable {option}") from None


def student_depth(teacher: Teacher, requested: int | None) -> int:
    """Return the student's number of layers: `requested`, or half the teacher's; raise if out of range."""
    total = teacher.family.num_layers(teacher.config)
    layers = max(1, total // 2) if requested is None else requested
    if not 1 <= layers <= total:
        raise EdgeDistillError(f"--student-layers {layers} is out of range: the teacher has {total} layers",
                               hint=f"pass a number from 1 to {total}")
    return layers


def check_max_length(teacher: Teacher, max_length: int) -> int:
    """Return `max_length` if the teacher's position embeddings cover it, else raise."""
    limit = getattr(teacher.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise EdgeDistillError(f"--max-length {max_length} exceeds the teacher's {limit} positions",
                               hint=f"pass --max-length {limit} or less")
    return max_length


def distill_student(teacher: Teacher, data: TransferSet, num_layers: int, max_length: int,
                    opts: CompileOptions, run_dir: Path | None = None) -> Distilled:
    """Label the transfer set with the teacher (cached), derive the student and distill it; done once for all targets.

    The distilled student is cached by the hash of everything it depends on (teacher, data, depth, length, split,
    training settings, process count): a compile that changes only its targets skips training. With `run_dir`,
    training checkpoints there every `opts.checkpoint_every` steps.
    """
    cache_dir = opts.cache_dir or default_cache_dir()
    train_idx, val_idx = split_indices(len(data), opts.val_fraction, opts.distill.seed)
    teacher_outputs = label_with_teacher(teacher, data, max_length, cache_dir)
    input_names = teacher.family.input_names(teacher.tokenizer)
    student, kept_layers = derive_student(teacher, num_layers)
    texts = lambda idx: [data.texts[i] for i in idx]  # noqa: E731
    head = asdict(teacher.module.pooling) if teacher.task == "feature-extraction" else teacher.task
    key = cache_key("student-v1", teacher.sha256, tokenizer_fingerprint(teacher.tokenizer), data.sha256, num_layers,
                    max_length, head, opts.val_fraction, sorted(asdict(opts.distill).items()), distributed.world(),
                    torch.__version__, __version__)
    trained = load_stage(cache_dir / "students" / key, student)
    if trained is None:
        labels = np.asarray(data.labels)[train_idx] if data.labels is not None else None
        checkpointing = None if run_dir is None else Checkpointing(run_dir / "checkpoint", key, opts.checkpoint_every,
                                                                    opts.resume)
        trained = distill(student, teacher.tokenizer, input_names, max_length,
                          (texts(train_idx), Rows(teacher_outputs, train_idx), labels),
                          (texts(val_idx), teacher_outputs[val_idx]), opts.distill, checkpointing)
        if distributed.is_main():
            save_stage(cache_dir / "students" / key, trained)
    val_student = torch_cpu.predict(trained.student, teacher.tokenizer, texts(val_idx), input_names, max_length)
    return Distilled(teacher, data, trained, kept_layers, input_names, max_length, train_idx, val_idx,
                     np.asarray(teacher_outputs[val_idx]), val_student)


def build_target(d: Distilled, profile: TargetProfile, stage_dir: Path, out_dir: Path, opts: CompileOptions) -> TargetResult:
    """Build the profile's model (its runtime's backend), validate and time what ships; publish if it keeps the budget."""
    teacher = d.teacher
    stage_dir.mkdir(parents=True)
    metric, floor = primary_metric(teacher.task, profile.accuracy_budget)
    search_texts, search_teacher = d.val_texts[:SEARCH_TEXTS], d.val_teacher[:SEARCH_TEXTS]

    def search_fidelity(run, fixed_shape) -> float:
        out = predict_with(run, teacher.tokenizer, search_texts, d.input_names, d.max_length, fixed_shape)
        return fidelity_metrics(out, search_teacher, teacher.task)[metric]

    calibration_texts = [d.data.texts[i] for i in d.train_idx[:getattr(profile.quantization, "calibration_texts", 8)]]
    ctx = BuildContext(d.trained.student, teacher.family, teacher.tokenizer, d.input_names, d.max_length,
                       calibration_texts, search_fidelity, floor)
    built = build_model(profile, ctx, stage_dir)
    val_artifact = predict_with(built.run, teacher.tokenizer, d.val_texts, d.input_names, d.max_length, built.fixed_shape)
    validation = validate(val_artifact, d.val_teacher, d.val_student, teacher.task, profile.accuracy_budget, d.val_labels)
    latency = (unmeasured_latency(profile, built.not_measured) if built.not_measured
               else measure_latency(teacher, built.run, profile, d.val_texts, d.input_names))
    save_tokenizer(teacher.tokenizer, d.max_length, stage_dir / "tokenizer")
    files = {**built.files, **{f.name: f for f in sorted((stage_dir / "tokenizer").iterdir()) if f.is_file()},
             **write_validation_set(stage_dir, d.val_texts, d.val_teacher, d.val_labels)}
    manifest = build_manifest(d, profile, built, validation, latency, opts)
    report = render_report(manifest, published=validation.passed)
    published, rejected = out_dir / profile.name, out_dir / f"{profile.name}.rejected.md"
    # this compile's verdict supersedes an older one: never leave a stale artifact beside a new rejection, or back
    if validation.passed:
        path = write_artifact(published, files, manifest, report)
        rejected.unlink(missing_ok=True)
    else:
        rejected.write_text(report, encoding="utf-8")
        path = rejected
        if published.is_dir():
            shutil.rmtree(published)
    return TargetResult(profile, validation.passed, path, manifest)


def save_tokenizer(tokenizer, max_length: int, out_dir: Path) -> None:
    """Save the tokenizer with the truncation length the artifact was validated at (and padding), also in tokenizer.json."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = max_length
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # plain `tokenizers` users get the same truncation and padding
        backend.enable_truncation(max_length=max_length)
        backend.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    tokenizer.save_pretrained(out_dir)


def tokenizer_fingerprint(tokenizer) -> str:
    """Return a hash of the tokenizer's behaviour (the teacher's sha256 covers config and weights, not the tokenizer)."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # truncation/padding are per-call state that transformers sets on the backend: not identity
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        text = json.dumps(spec, sort_keys=True)
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def label_with_teacher(teacher: Teacher, data: TransferSet, max_length: int, cache_dir: Path) -> np.ndarray:
    """Return the teacher's outputs for every text as a read-only memory map: texts the cache has seen (with this
    teacher, max length and head) are not labelled again; the rest are labelled in shards, split across processes."""
    head = asdict(teacher.module.pooling) if teacher.task == "feature-extraction" else teacher.task
    store = LabelStore(cache_dir / "labels" / cache_key("v2", teacher.sha256, tokenizer_fingerprint(teacher.tokenizer),
                                                       max_length, head))
    names = teacher.family.input_names(teacher.tokenizer)
    assembled = store.root / f"assembled-{data.sha256[:24]}-{len(data)}.npy"
    with new_progress() as progress:
        bars = []

        def compute(texts: list[str]) -> np.ndarray:
            return torch_cpu.predict(teacher.module, teacher.tokenizer, texts, names, max_length)

        def on_todo(n: int) -> None:
            if n:
                bars.append(progress.add_task("labelling with the teacher", total=n, status=""))

        outputs = label_sharded(store, data.texts, assembled, compute, distributed.rank(), distributed.world(),
                                distributed.barrier, on_todo, lambda n: bars and progress.update(bars[0], advance=n))
    if not all(np.isfinite(outputs[i : i + 65536]).all() for i in range(0, len(outputs), 65536)):  # in bounded chunks
        raise DataError("the teacher produced non-finite outputs on the transfer set", hint="check the teacher checkpoint")
    return outputs


def derive_student(teacher: Teacher, num_layers: int) -> tuple[EncoderWithHead, list[int]]:
    """Return the student (teacher architecture, `num_layers` layers) with the teacher's head, and the layers it kept."""
    model, kept = teacher.family.derive_student(teacher.module.model, num_layers)
    return EncoderWithHead(model, teacher.task, teacher.module.pooling if teacher.task == "feature-extraction" else None), kept


def unmeasured_latency(profile: TargetProfile, reason: str) -> dict:
    """Return the latency section of a target whose device is not here: the shape it would run, and why no number."""
    return {"batch": profile.input_shape.batch, "sequence": profile.input_shape.sequence,
            "threads_profile": profile.threads, "threads_measured": 0, "not_measured": reason,
            "note": f"not measured: {reason}. Run `edgedistill bench` on a machine with the device."}


def measure_latency(teacher: Teacher, run, profile: TargetProfile, texts: list[str], input_names: list[str]) -> dict:
    """Return latency statistics of the artifact and the teacher (torch fp32), interleaved call by call on the same
    inputs at the profile's shape and threads, and their paired ratio."""
    shape, threads = profile.input_shape, profile.effective_threads
    batches = [feeds for _, feeds in iter_batches(teacher.tokenizer, texts[: 8 * shape.batch], input_names,
                                                  shape.sequence, shape.batch, fixed=True)]
    # a GPU artifact is compared with the teacher on the same GPU when torch has one (`.cpu()` waits for the kernels)
    device = "cuda" if profile.gpu and torch.cuda.is_available() else "cpu"
    module = teacher.module.to(device)
    torch_batches = [{k: torch.from_numpy(v).to(device) for k, v in b.items()} for b in batches]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            stats = measure_interleaved({"artifact": (run, batches), "teacher": (lambda x: module(**x).cpu(), torch_batches)},
                                        min_time_s=2.0)
    finally:
        torch.set_num_threads(previous)
        teacher.module.to("cpu")
    artifact, teacher_stats = stats["artifact"], stats["teacher"]
    note = (f"5 warm-up runs each, then ≥2 s of interleaved ~0.2 s blocks (artifact, teacher, artifact, ...; 2 untimed "
            f"calls open each block) on {len(batches)} rotating batches of real held-out text padded to {shape.sequence} "
            "tokens; speed-up = median over block pairs of teacher / artifact block medians.")
    return {"batch": shape.batch, "sequence": shape.sequence, "threads_profile": profile.threads, "teacher_device": device,
            "threads_measured": threads, "artifact": artifact.as_dict(), "teacher_torch_fp32": teacher_stats.as_dict(),
            "speedup_vs_teacher": 1.0 / paired_ratio(artifact.block_p50_ms, teacher_stats.block_p50_ms), "note": note}


def _mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def build_manifest(d: Distilled, profile: TargetProfile, built: Built, validation, latency: dict,
                   opts: CompileOptions) -> Manifest:
    """Return the manifest of one target's artifact (files and their hashes are added when it is written)."""
    import onnx
    import onnxruntime
    import transformers

    teacher, data, trained = d.teacher, d.data, d.trained
    teacher_mb = weights_mb(teacher.path)
    model_mb = _mb(built.files[built.model_file])
    student_config = trained.student.model.config
    return Manifest(
        edgedistill_version=__version__,
        target=profile.model_dump(mode="json"),
        teacher={"name": teacher.name, "sha256": teacher.sha256, "model_type": student_config.model_type,
                 "task": teacher.task, "num_layers": teacher.family.num_layers(teacher.config),
                 "num_parameters": count_parameters(teacher.module), "label_names": teacher.label_names,
                 "pooling": asdict(teacher.module.pooling) if teacher.task == "feature-extraction" else None},
        student={"num_layers": teacher.family.num_layers(student_config), "kept_teacher_layers": d.kept_layers,
                 "num_parameters": count_parameters(trained.student), "config": student_config.to_diff_dict()},
        data={"source": data.source, "sha256": data.sha256, "num_texts": len(data), "num_train": len(d.train_idx),
              "num_validation": len(d.val_idx), "labelled": data.labels is not None, "max_length": d.max_length,
              "val_fraction": opts.val_fraction},
        distillation={"config": asdict(opts.distill), "best_fidelity": trained.best_fidelity,
                      "best_step": trained.best_step, "history": trained.history},
        export=built.record["export"],
        optimization=built.record["optimization"],
        quantization=built.record["quantization"],
        model=built.record["model"],
        metrics={"values": validation.metrics, "budget": profile.accuracy_budget.model_dump(),
                 "passed": validation.passed, "verdict": validation.verdict},
        latency=latency,
        sizes={"model_mb": model_mb, "teacher_weights_mb": teacher_mb, "size_ratio": model_mb / teacher_mb},
        versions={"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                  "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "platform": platform.platform(),
                  "machine": platform.machine()},
        seed=opts.distill.seed,
    )
