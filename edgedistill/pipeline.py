"""compile(): teacher -> student -> distill -> export -> optimize -> quantize -> validate -> artifact, per target.

The stages are the same for every model family; the teacher's family (families/base.py) does each one its way."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from edgedistill import distributed, progress, runs
from edgedistill.artifact import Manifest, write_artifact
from edgedistill.cache import default_cache_dir
from edgedistill.distill.loop import DistillConfig
from edgedistill.errors import EdgeDistillError, ProfileError
from edgedistill.families.base import Family, TargetBuild
from edgedistill.report import render_summary
from edgedistill.runs import RUN_DIR
from edgedistill.targets import TargetProfile, cpu_flags, resolve_target
from edgedistill.teachers import load_teacher

SUMMARY = "summary.md"
Task = Literal["feature-extraction", "text-classification", "text-generation", "image-classification"]


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
    arch: str | None = None  # vision: 'package.module:factory' building the architecture a state-dict teacher fits
    arch_kwargs: dict | None = None  # vision: keyword arguments of --arch
    normalize: str | None = None  # vision: a user model's input normalization (imagenet, tf, none, 'm/s'; None: imagenet)
    image_size: int | None = None  # vision: a user model's input crop (None: 224)
    crop_scale: float | None = None  # vision: smallest share of an image a training crop covers (None: 0.25)
    resize: int | None = None  # vision: held-out images' short side before the center crop (None: size * 256/224)
    keep_rejected: bool = False  # also write a rejected artifact, whole, to OUT/<target>.rejected/ (to inspect, bench)
    top_k: int = 256  # causal LMs: teacher tokens kept per position in the soft-label cache (README: k measured)
    layer_criterion: str = "perplexity"  # causal LMs: how the student's layers are chosen
    student: str | None = None  # causal LMs: a student checkpoint to distill into, instead of a derived one
    macs_ratio: float | None = None  # vision: the student's share of the teacher's MACs (resolution first, then channels; None: 1.0)
    resolution: int | None = None  # vision: the student's own input side (resized inside; None: the input's)
    drop_blocks: int = 0  # vision: residual blocks the student goes without (least output change first), before pruning
    fresh_views: bool = False  # vision: every step draws new crops and the teacher labels them in the loop
    mixup: float = 0.0  # vision, with fresh_views: Beta(alpha, alpha) mixup; the teacher sees the same mixed images
    # vision: weight of the stage-output matching loss beside the logits' KL; encoders: of the last-layer token-state
    # loss beside the embedding's or logits' (0: off)
    feature_weight: float = 0.0
    ffn_ratio: float = 1.0  # causal LMs: share of each layer's FFN neurons the student keeps (activation importance)
    generate: int = 0  # causal LMs: training windows the teacher writes itself (sequence-level KD), cached
    quantization_aware: bool | None = None  # causal LMs: distill through the targets' weight rounding (None: when
    # every target rounds the same rtn way; distill/qat.py)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # --search: try the family's student shapes (successive halving on distillation steps) within a time budget and
    # keep the fastest artifact that meets every constraint (search.py)
    search: bool = False
    time_budget_s: float = 1200.0
    max_latency_ms: float | None = None
    min_fidelity: float | None = None  # None: the target's own budget
    max_size_mb: float | None = None
    stop_at: float | None = None  # internal: stop the distillation at this share of its steps (a search's rung)

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
    """The distilled torch student (before export; None after a search) and one result per target."""

    student: torch.nn.Module | None
    targets: list[TargetResult]
    family: Family | None = None
    distilled: object | None = None  # what the family's targets were built from (its views, labels, student)


def compile(teacher_spec: str | None, data_path: str | None, target_specs: list[str], out_dir: Path,
            opts: CompileOptions) -> CompileResult:
    """Compile the teacher into one artifact per target under out_dir/<target>/.

    Under `accelerate launch` every process runs this: they share labelling and training, and the main process
    alone builds and writes the artifacts (the others return no targets). `opts.resume` continues the distillation
    of a killed run from its last checkpoint in out_dir.
    """
    started = time.monotonic()
    profiles = resolve_targets(target_specs)  # fail fast: bad profiles, unwritable output, before any work
    check_writable(out_dir, "--out")
    check_writable(opts.cache_dir or default_cache_dir(), "--cache-dir")
    # the teacher, the options and the data are checked before OUT is locked (which creates it): a refused compile
    # writes nothing
    teacher = load_teacher(teacher_spec, opts.task, user_vision_model(teacher_spec, opts), cache_dir=opts.cache_dir)
    family: Family = teacher.family
    for profile in profiles:
        family.check_target(profile)
    family.check_options(teacher, opts, profiles)
    if opts.search:
        from edgedistill.search import check_search

        check_search(family, teacher, opts, profiles)
    data = family.load_data(teacher, data_path, opts)
    timings = {"load_s": round(time.monotonic() - started, 2)}
    with runs.run_lock(out_dir) if distributed.is_main() else contextlib.nullcontext():
        if distributed.is_main():
            if not opts.resume and ((out_dir / RUN_DIR / "checkpoint").is_dir()
                                    or (out_dir / RUN_DIR / "search" / "state.json").is_file()):
                progress.console.print(f"note: {out_dir} holds a checkpoint of an interrupted compile; starting over "
                                       f"(`edgedistill compile --resume {out_dir}` would have continued it)")
            runs.save_run(out_dir, teacher_spec, data_path, target_specs, opts.to_json())
        if opts.search:
            return searched(family, teacher, data, profiles[0], out_dir, opts, timings)
        try:
            at = time.monotonic()
            distilled = family.distill_student(teacher, data, opts, out_dir / RUN_DIR, profiles)
            timings["distill_s"] = round(time.monotonic() - at, 2)
        except EdgeDistillError:  # a user error, not a kill: no checkpoint worth resuming from is left behind
            if distributed.is_main() and not (out_dir / RUN_DIR / "checkpoint").is_dir():
                shutil.rmtree(out_dir / RUN_DIR, ignore_errors=True)
            raise
        if not distributed.is_main():
            return CompileResult(distilled.trained.student, [], family)
        with tempfile.TemporaryDirectory(prefix=".edgedistill-work-", dir=out_dir) as work:
            results = []
            for profile in profiles:
                (Path(work) / profile.name).mkdir(parents=True)
                at = time.monotonic()
                built = family.build_target(distilled, profile, Path(work) / profile.name, opts)
                built.manifest.timings = {**timings, "build_s": round(time.monotonic() - at, 2),
                                          "targets": len(profiles)}
                results.append(publish(family, built, profile, out_dir, opts.keep_rejected))
        if len(results) > 1:
            (out_dir / SUMMARY).write_text(render_summary(results, family), encoding="utf-8")
        shutil.rmtree(out_dir / RUN_DIR, ignore_errors=True)  # finished: nothing to resume (the student is cached)
        return CompileResult(distilled.trained.student, results, family, distilled)


def searched(family: Family, teacher, data, profile: TargetProfile, out_dir: Path, opts: CompileOptions,
             timings: dict[str, float | int]) -> CompileResult:
    """compile --search: the fastest searched student that meets every limit, published like any artifact (its
    report and manifest holding every evaluation, search.html the plot); the closest one rejected if none does."""
    from edgedistill.search import run_search
    from edgedistill.search_report import render_search_md

    at = time.monotonic()
    built, record = run_search(family, teacher, data, profile, out_dir / RUN_DIR, opts)
    built.manifest.timings = {**timings, "search_s": round(time.monotonic() - at, 2), "targets": 1}
    result = publish(family, built, profile, out_dir, opts.keep_rejected, report_extra=render_search_md(record))
    shutil.rmtree(out_dir / RUN_DIR, ignore_errors=True)  # finished: the evaluations are in the manifest
    return CompileResult(None, [result], family)


def user_vision_model(teacher_spec: str | None, opts: CompileOptions):
    """Return how to build a user's image classifier from --arch/--arch-kwargs/--normalize/--image-size, or None;
    refuse those options for any other teacher."""
    from edgedistill.teachers.vision import USER_MODEL_SUFFIXES, UserVisionModel

    given = [f for f, v in (("--arch", opts.arch), ("--arch-kwargs", opts.arch_kwargs), ("--normalize", opts.normalize),
                            ("--image-size", opts.image_size)) if v is not None]
    if not (teacher_spec or "").endswith(USER_MODEL_SUFFIXES):
        if given:
            raise EdgeDistillError(f"{given[0]} is for your own image classifier (a .pt2 program, or a .safetensors / "
                                   f".pt / .pth state dict), not for {teacher_spec or 'minilm'}", hint=f"leave out {given[0]}")
        return None
    return UserVisionModel(opts.arch, opts.arch_kwargs, opts.normalize or "imagenet", opts.image_size or 224)


def publish(family: Family, built: TargetBuild, profile: TargetProfile, out_dir: Path,
            keep_rejected: bool = False, report_extra: str = "") -> TargetResult:
    """Write the artifact to OUT/<target>/ if it kept its budget, else its report to OUT/<target>.rejected.md (and,
    with `keep_rejected`, the whole rejected artifact to OUT/<target>.rejected/, its report saying REJECTED).

    This compile's verdict supersedes an older one: never leave a stale artifact beside a new rejection, or back."""
    host = cpu_flags()  # empty where /proc/cpuinfo is not: nothing is known, nothing is said
    missing = sorted(set(profile.cpu_flags) - host) if host else []
    if missing:  # validated and timed on other kernels than the target CPU's (the report says so)
        built.manifest.latency["host_lacks_cpu_flags"] = missing
    report = family.render_report(built.manifest, published=built.passed)
    if built.manifest.timings:
        report = report.rstrip("\n") + "\n\n" + render_timings(built.manifest.timings)
    if report_extra:
        report = report.rstrip("\n") + "\n\n" + report_extra
    published, rejected = out_dir / profile.name, out_dir / f"{profile.name}.rejected.md"
    kept = out_dir / f"{profile.name}.rejected"
    if built.passed:
        path = write_artifact(published, built.files, built.manifest, report)
        rejected.unlink(missing_ok=True)
        if kept.is_dir():
            shutil.rmtree(kept)
    else:
        rejected.write_text(report, encoding="utf-8")
        path = rejected
        if published.is_dir():
            shutil.rmtree(published)
        if keep_rejected:
            write_artifact(kept, built.files, built.manifest, report)
        elif kept.is_dir():
            shutil.rmtree(kept)
    return TargetResult(profile, built.passed, path, built.manifest)


def render_timings(t: dict[str, float | int]) -> str:
    """The report's "Compile time" section: where this compile's wall time went, stage by stage."""
    shared = f" (shared by the {t['targets']} targets)" if t.get("targets", 1) > 1 else ""
    rows = [("teacher, transfer set and checks", t.get("load_s")),
            (f"labels, student and distillation{shared}; seconds when cached", t.get("distill_s")),
            ("search: every student trained and built", t.get("search_s")),
            ("this target: export, optimization, quantization, validation, timing", t.get("build_s"))]
    return "## Compile time\n\n| stage | wall s |\n|---|---|\n" + "".join(
        f"| {name} | {s:.1f} |\n" for name, s in rows if s is not None)


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
    """Prove a file can be written in `path` (creating it for the test, and removing again what it created), or
    raise EdgeDistillError naming the option."""
    if path.exists() and not path.is_dir():
        raise EdgeDistillError(f"{option} {path} is a file, not a directory", hint=f"pass a directory to {option}")
    created = [p for p in [path, *path.parents] if not p.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise EdgeDistillError(f"cannot write to {option} {path}: {e.strerror}", hint=f"pass a writable {option}") from None
    finally:
        for p in created:  # a refused compile leaves nothing behind; the run lock creates OUT when work starts
            with contextlib.suppress(OSError):
                p.rmdir()


