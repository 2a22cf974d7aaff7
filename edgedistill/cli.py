"""The `edgedistill` command: parses arguments, calls the pipeline, turns user errors into one red line + exit 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgedistill.errors import BudgetError, EdgeDistillError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Distill, quantize and verify a teacher model into a device artifact per target.")


def _version(value: bool) -> None:
    if value:
        from edgedistill import __version__

        sys.stdout.write(f"edgedistill {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version")) -> None:
    """Distill, quantize and verify a teacher model into a device artifact per target."""
targets_app = typer.Typer(help="List, show and describe target profiles.", pretty_exceptions_enable=False)
app.add_typer(targets_app, name="targets")
# emoji off: a path or --arch such as mynet:factory: is printed as typed, not as an emoji
out = Console(width=None if sys.stdout.isatty() else 120, emoji=False)
err = Console(stderr=True, emoji=False)


def fail(e: EdgeDistillError) -> None:
    err.print(f"[bold red]error:[/] {escape(e.message)}" + (f" [dim](hint: {escape(e.hint)})[/]" if e.hint else ""),
              highlight=False, soft_wrap=True)  # escaped: a path like a[/]b is text, not markup
    raise typer.Exit(2)


def _json_object(text: str | None, option: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        fail(EdgeDistillError(f"{option} is not JSON: {e.msg} at character {e.pos}", hint=f"""pass e.g. {option} '{{"num_classes": 10}}'"""))
    if not isinstance(value, dict):
        fail(EdgeDistillError(f"{option} must be a JSON object, got {type(value).__name__}", hint=f"""pass e.g. {option} '{{"num_classes": 10}}'"""))
    return value


@app.command("compile")
def compile_cmd(
    teacher: Optional[str] = typer.Argument(None, help="Model directory (HF encoder, sentence-transformers or causal LM), a .gguf file, an image classifier (.pt2 program, or a state dict with --arch), or a built-in: minilm, smollm2, mobilenetv2, efficientnet-lite0 (default: minilm)"),
    data: Optional[str] = typer.Option(None, "--data", help="Texts: .txt (a text per line), .jsonl or .csv, or builtin:english / builtin:varied; images: a folder or an .npz (default: encoders builtin:varied, LMs builtin:english, image classifiers the built-in photos)"),
    target: Optional[list[str]] = typer.Option(None, "--target", help="Profile name or YAML path; repeat for several (default: this CPU)"),
    out_dir: Path = typer.Option(Path("build"), "--out", help="Artifacts go to OUT/<target>/"),
    task: Optional[str] = typer.Option(None, "--task", help="feature-extraction | text-classification | text-generation (default: from the checkpoint)"),
    student_layers: Optional[int] = typer.Option(None, "--student-layers", help="Student depth (default: half the teacher's; 2/3 for LMs)"),
    epochs: int = typer.Option(2, "--epochs", min=1),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    lr: float | None = typer.Option(None, "--lr", min=0.0, help="AdamW's peak learning rate (default 3e-4; 1e-5 for an image classifier distilled quantization-aware in the teacher's own shape)"),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=8, help="Tokens per text (default: the teacher's); LMs: tokens per training window (default: 128)"),
    max_texts: Optional[int] = typer.Option(None, "--max-texts", help="Use only the first N texts of the data"),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="Held-out share for validation (at most 2000 texts)"),
    seed: int = typer.Option(0, "--seed"),
    eval_every: int = typer.Option(0, "--eval-every", min=0, metavar="STEPS", help="Validate (and keep the best student) every N steps (default 0: once per epoch)"),
    text_column: str = typer.Option("text", "--text-column", help="JSONL field / CSV column holding the text"),
    label_column: str = typer.Option("label", "--label-column", help="JSONL field / CSV column holding the label"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Teacher-output and student cache (default: ~/.cache/edgedistill)"),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", min=1, help="Checkpoint the distillation every N steps"),
    student: Optional[str] = typer.Option(None, "--student", help="LMs: a causal-LM directory (the teacher's tokenizer) to distill into, instead of a student derived from the teacher"),
    top_k: int = typer.Option(256, "--top-k", min=1, help="LMs: teacher tokens per position kept in the soft-label cache (4k + 8 bytes per token)"),
    layer_criterion: str = typer.Option("perplexity", "--layer-criterion", help="LMs: perplexity | block-influence | even (which teacher layers the student keeps)"),
    divergence: str = typer.Option("forward-kl", "--divergence", help="LMs: forward-kl | reverse-kl | jsd"),
    lm_temperature: float = typer.Option(1.0, "--lm-temperature", min=0.05, help="LMs: distillation temperature"),
    ce_weight: float = typer.Option(0.0, "--ce-weight", min=0.0, max=1.0, help="LMs: share of next-token cross-entropy on the data in the loss"),
    jsd_beta: float = typer.Option(0.5, "--jsd-beta", min=0.0, max=1.0, help="LMs: GKD's beta for --divergence jsd"),
    macs_ratio: Optional[float] = typer.Option(None, "--macs-ratio", help="Vision: the student's share of the teacher's MACs, spent on a lower input side first (the largest multiple of 16 px within it, down to half the side), then channels pruned with torch-pruning (default 1.0: the teacher's layers, untrained, their weights rounded by GPTQ; the only shape that met the 0.9 budget on the built-in photos)"),
    ffn_ratio: float = typer.Option(1.0, "--ffn-ratio", help="LMs and text encoders: share of each layer's FFN neurons the student keeps, by measured activation (width pruning)"),
    generate: int = typer.Option(0, "--generate", min=0, metavar="N", help="LMs: the teacher writes N training windows continuing transfer-set prompts (sequence-level KD; sampled, cached)"),
    quantization_aware: Optional[bool] = typer.Option(None, "--quantization-aware/--no-quantization-aware", help="LMs and vision: distill through the targets' rounding (fake quantization, straight-through gradients: LMs int4/int8 rtn weights, CNNs static int8, onnxruntime's or XNNPACK's); default: when every target's int8 is one the student can be trained through (vision: only the teacher's layers at a lower --resolution; its own shape is rounded by GPTQ)"),
    arch: Optional[str] = typer.Option(None, "--arch", metavar="PKG.MODULE:FACTORY", help="Vision: the architecture a state-dict teacher (.safetensors, .pt, .pth) fits, built by calling FACTORY"),
    arch_kwargs: Optional[str] = typer.Option(None, "--arch-kwargs", metavar="JSON", help="Vision: keyword arguments for --arch, as a JSON object"),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="Vision: the normalization your model expects on [0, 1] RGB: imagenet (default), tf, none, or m1,m2,m3/s1,s2,s3; it goes inside the artifact"),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=8, max=2048, help="Vision: your model's input crop in pixels (default 224)"),
    crop_scale: Optional[float] = typer.Option(None, "--crop-scale", help="Vision: the smallest share of an image a random training crop covers (RandomResizedCrop's scale; default 0.25; near 1 for images the object fills, as Fashion-MNIST)"),
    fresh_views: bool = typer.Option(False, "--fresh-views", help="Vision: every training step draws new random crops of the photos and the teacher labels them in the loop (function matching), instead of its cached logits on a fixed set of views"),
    mixup: float = typer.Option(0.0, "--mixup", metavar="ALPHA", help="Vision, with --fresh-views: mix pairs of views with Beta(ALPHA, ALPHA) weights; the teacher sees the same mixed images (consistent teaching)"),
    feature_weight: float = typer.Option(0.0, "--feature-weight", metavar="W", help="Also match the teacher's features with weight W; 0 = off. Encoders: the student's last-layer token states, beside the embedding or logits loss (the teacher's are labelled once, in float16, and cached). Vision: its stage outputs (the last block at each resolution, through 1x1 projectors dropped after training; the teacher runs on each batch), beside the logits' KL"),
    resolution: Optional[int] = typer.Option(None, "--resolution", metavar="PX", help="Vision: the student's own input side: the artifact still takes --image-size pixels and resizes them inside (e.g. 160 at 224: 51% of the MACs with the teacher's layers intact, distilled quantization-aware; channels are pruned only to an explicit --macs-ratio); default: the input's side, channels pruned to --macs-ratio"),
    drop_blocks: int = typer.Option(0, "--drop-blocks", min=0, metavar="N", help="Vision: leave N shape-preserving (residual) blocks out of the student, those whose absence moves the teacher's outputs least (measured, greedy); then channels are pruned to --macs-ratio"),
    resize: Optional[int] = typer.Option(None, "--resize", metavar="PX", help="Vision: held-out images' short side before the center crop of --image-size (default ImageNet's 256 for 224; equal to --image-size: no crop)"),
    keep_rejected: bool = typer.Option(False, "--keep-rejected", help="Also write an artifact that misses its budget, whole, to OUT/<target>.rejected/ (to inspect or bench; its report says REJECTED; the exit code is still 2)"),
    search: bool = typer.Option(False, "--search", help="Try the family's student shapes (encoders: 1-4 layers x FFN 1 or 1/2; LMs: 2/3, 1/2, 1/3 of the layers x FFN 1 or 3/4; vision: 100/70/50/35% of the MACs) by successive halving on distillation steps within --time-budget, each built and measured on the target; keep the fastest that meets every limit"),
    time_budget: Optional[str] = typer.Option(None, "--time-budget", metavar="DURATION", help="With --search: wall-clock budget, e.g. 20m, 90s, 1h30m (default 20m)"),
    max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="With --search: the artifact's latency limit on the target (as build measures it)"),
    min_fidelity: Optional[float] = typer.Option(None, "--min-fidelity", help="With --search: the fidelity floor (cosine or top-1 agreement; the target's budget always applies too)"),
    max_size_mb: Optional[float] = typer.Option(None, "--max-size-mb", help="With --search: the model file's size limit"),
    resume: Optional[Path] = typer.Option(None, "--resume", metavar="OUT",
                                          help="Continue the interrupted compile that wrote to OUT, with its original arguments (other options are ignored, except --time-budget for a search)"),
) -> None:
    """Compile TEACHER into a distilled, quantized, validated artifact for each --target.

    Scales with `accelerate launch --num_processes N -m edgedistill.cli compile ...` (labelling and training are
    shared; the main process writes the artifacts)."""
    from edgedistill import distributed
    from edgedistill.distill.loop import DistillConfig
    from edgedistill.pipeline import CompileOptions, compile, load_run
    from edgedistill.report import warnings_for

    if task not in (None, "feature-extraction", "text-classification", "text-generation", "image-classification"):
        fail(EdgeDistillError(f"unknown task '{task}'",
                              hint="use feature-extraction, text-classification, text-generation or image-classification"))
    if layer_criterion not in ("perplexity", "block-influence", "even"):
        fail(EdgeDistillError(f"unknown --layer-criterion '{layer_criterion}'", hint="use perplexity, block-influence or even"))
    if divergence not in ("forward-kl", "reverse-kl", "jsd"):
        fail(EdgeDistillError(f"unknown --divergence '{divergence}'", hint="use forward-kl, reverse-kl or jsd"))
    given = [f for f, v in (("--time-budget", time_budget), ("--max-latency-ms", max_latency_ms),
                            ("--min-fidelity", min_fidelity), ("--max-size-mb", max_size_mb)) if v is not None]
    if given and not search and resume is None:
        fail(EdgeDistillError(f"{given[0]} is a limit of --search", hint=f"add --search, or leave out {given[0]}"))
    try:
        from edgedistill.search import parse_duration

        budget_s = parse_duration(time_budget) if time_budget is not None else 1200.0
    except EdgeDistillError as e:
        fail(e)
    opts = CompileOptions(task=task, student_layers=student_layers, max_length=max_length, val_fraction=val_fraction,
                          max_texts=max_texts, text_column=text_column, label_column=label_column, cache_dir=cache_dir,
                          checkpoint_every=checkpoint_every, top_k=top_k, layer_criterion=layer_criterion, student=student,
                          quantization_aware=quantization_aware, generate=generate, ffn_ratio=ffn_ratio, macs_ratio=macs_ratio,
                          arch=arch, arch_kwargs=_json_object(arch_kwargs, "--arch-kwargs"), normalize=normalize,
                          image_size=image_size, crop_scale=crop_scale, resize=resize, resolution=resolution, drop_blocks=drop_blocks, fresh_views=fresh_views, mixup=mixup, feature_weight=feature_weight, keep_rejected=keep_rejected, search=search, time_budget_s=budget_s, max_latency_ms=max_latency_ms, min_fidelity=min_fidelity, max_size_mb=max_size_mb, distill=DistillConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, eval_every=eval_every,
                                                divergence=divergence, lm_temperature=lm_temperature,
                                                ce_weight=ce_weight, jsd_beta=jsd_beta))
    try:
        if resume is not None:
            teacher, data, target, opts = load_run(resume)
            out_dir = resume
            if time_budget is not None:  # a resumed search may be given more time; every other option is the run's
                if not opts.search:
                    raise EdgeDistillError(f"--time-budget: the compile in {resume} is not a search",
                                           hint="leave out --time-budget")
                opts.time_budget_s = budget_s
        compiled = compile(teacher, data, target or [], out_dir, opts)
        results, family = compiled.targets, compiled.family
    except EdgeDistillError as e:
        fail(e)
    except OSError as e:  # disk full, read-only, permissions changed mid-run: the artifact was not published
        fail(EdgeDistillError(f"cannot write {e.filename or out_dir}: {e.strerror}",
                              hint="free space or fix permissions, then re-run (with --resume OUT to keep the training done)"))
    if not distributed.is_main():
        return  # the main process reports
    table = Table(title="edgedistill compile")
    table.add_column("", no_wrap=True)
    for r in results:
        table.add_column(r.profile.name, overflow="fold")
    rows = {"status": [], "fidelity vs teacher": [], "latency vs teacher": [], "size vs teacher": [], "artifact": [],
            "warnings": []}
    for r in results:
        cells = family.summary_cells(r.manifest)
        rows["status"].append("[green]pass[/]" if r.published else "[red]FAIL[/]")
        rows["fidelity vs teacher"].append(cells["fidelity"])
        rows["latency vs teacher"].append(cells["latency"])
        rows["size vs teacher"].append(cells["size"])
        rows["artifact"].append(str(r.path))
        rows["warnings"].append(" ".join(warnings_for(r.manifest)) or "none")
    for name, cells in rows.items():
        table.add_row(name, *cells)
    out.print(table)
    failed = [r for r in results if not r.published]
    if failed:
        larger = "more --student-layers"
        if failed[0].manifest.family == "vision":
            full = (failed[0].manifest.student.get("pruning") or {}).get("macs_ratio", 0) >= 0.999
            larger = "a lower vision budget in the target profile (the student already has the teacher's layers)" if full \
                else "a larger --macs-ratio"
        if failed[0].manifest.search:
            larger = "a larger --time-budget or looser limits"
        hint = f"see the .rejected.md report; try more --epochs, more --data or {larger}"
        if "not_distilled" in (failed[0].manifest.student.get("pruning") or {}):  # the teacher's weights, only rounded
            hint = ("see the .rejected.md report: the student is the teacher's own weights, only quantized for this "
                    "target; try --quantization-aware (when the target's int8 is static: onnxruntime's QDQ or XNNPACK's) or "
                    "a lower vision budget in the target profile")
        fail(BudgetError("; ".join(f"{r.profile.name}: {r.manifest.metrics['verdict']}" for r in failed), hint=hint))


@targets_app.callback(invoke_without_command=True)
def targets_list(ctx: typer.Context) -> None:
    """List the built-in target profiles (and mark the one matching this CPU)."""
    if ctx.invoked_subcommand is not None:
        return
    from edgedistill.targets import builtin_profiles, detect_target

    try:
        profiles = builtin_profiles()
        try:
            detected = detect_target().name
        except EdgeDistillError:
            detected = None
    except EdgeDistillError as e:
        fail(e)
    table = Table(title="target profiles (details: edgedistill targets show NAME)")
    table.add_column("name", no_wrap=True)
    for col in ("provider", "threads", "quantization", "min cosine", "min top-1", "causal LMs"):
        table.add_column(col)
    for p in profiles.values():
        lm = p.causal_lm
        lm_cell = ("—" if lm is None or lm.unsupported else
                   (f"int{lm.quantization.bits}" if lm.quantization.recipe == "weight-only" else lm.quantization.recipe))
        table.add_row(p.name + (" (this CPU)" if p.name == detected else ""), p.execution_provider, str(p.threads),
                      p.quantization.recipe, str(p.accuracy_budget.min_cosine), str(p.accuracy_budget.min_top1_agreement),
                      lm_cell)
    out.print(table)


@targets_app.command("show")
def targets_show(name: str = typer.Argument(..., help="Profile name or YAML path")) -> None:
    """Print a resolved profile (defaults filled in) as YAML."""
    import yaml

    from edgedistill.targets import resolve_target

    try:
        profile = resolve_target(name)
    except EdgeDistillError as e:
        fail(e)
    sys.stdout.write(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False))


@targets_app.command("schema")
def targets_schema() -> None:
    """Print the JSON Schema of a target profile."""
    from edgedistill.targets import profile_json_schema

    sys.stdout.write(json.dumps(profile_json_schema(), indent=2) + "\n")


@app.command("verify")
def verify_cmd(
    artifact_dir: Path = typer.Argument(..., help="An OUT/<target> directory"),
    hashes_only: bool = typer.Option(False, "--hashes-only", help="Only check the files' sha256, do not re-run validation"),
) -> None:
    """Check an artifact: every file matches its sha256 in the manifest, and re-running its validation set in its
    runtime repeats the recorded fidelity and keeps the budget. Exit 0 if so, 1 if not, 2 if it is no artifact."""
    from edgedistill.artifact import read_manifest, verify_files
    from edgedistill.errors import ArtifactError

    try:
        read_manifest(artifact_dir)
    except EdgeDistillError as e:
        fail(e)
    try:
        manifest = verify_files(artifact_dir)
    except ArtifactError as e:
        err.print(f"[bold red]FAILED:[/] {escape(e.message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    out.print(f"[green]ok[/]: {len(manifest.files)} files match {escape(str(artifact_dir))}/manifest.json")
    if hashes_only:
        return
    from edgedistill.reverify import revalidate

    try:
        r = revalidate(artifact_dir, manifest)
    except EdgeDistillError as e:
        fail(e)
    table = Table(title=f"validation re-run: {manifest.data['num_validation']} held-out { {'causal-lm': 'windows', 'vision': 'views'}.get(manifest.family, 'texts')}")
    for col in ("metric", "recorded at compile", "now"):
        table.add_column(col)
    for k, v in r.measured.items():
        table.add_row(k, f"{r.recorded.get(k, float('nan')):.4f}", f"{v:.4f}")
    out.print(table)
    if not r.passed:
        err.print(f"[bold red]FAILED:[/] {escape(r.verdict)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    out.print(f"[green]ok[/]: {escape(r.verdict)}")


@app.command("bench")
def bench_cmd(
    artifacts: Optional[list[Path]] = typer.Argument(None, help="OUT/<target> directories written by compile"),
    suite: Optional[Path] = typer.Option(None, "--suite", help="A suite YAML (benchmarks/ci.yaml); options below override it"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher to compare with (default: the manifest's)"),
    runtime: Optional[list[str]] = typer.Option(None, "--runtime", help="ort-cpu | ort-mobile | executorch | ort-cuda | ort-tensorrt | ort-web | ort-webgpu | torch; repeat or comma-separate (default: each artifact's own target runtime)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads (default: the profiles', capped at the cores)"),
    batch: Optional[str] = typer.Option(None, "--batch", help="Batch sizes, comma-separated (default: 1,8)"),
    seq: Optional[int] = typer.Option(None, "--seq", min=1, help="Sequence length (default: 128)"),
    data: Optional[str] = typer.Option(None, "--data", help="Held-out texts (default: built-in English set, after the part compile used)"),
    held_out: Optional[int] = typer.Option(None, "--held-out", min=2, help="Held-out texts for fidelity (default: 500)"),
    min_time: Optional[float] = typer.Option(None, "--min-time", min=0.01, help="Seconds of timing per shape and round, all models interleaved (default: 3)"),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=1, help="Timing rounds per shape; the ratio to the teacher is their median (default: 5)"),
    no_memory: bool = typer.Option(False, "--no-memory", help="Skip the peak-memory probes (one process per model)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result (versioned schema) here"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="Write the markdown table here"),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write the HTML report with plots here"),
    github_out: Optional[Path] = typer.Option(None, "--github-benchmark", help="Write github-action-benchmark customSmallerIsBetter JSON here"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Compare with this stored --json result; exit 1 on regression"),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Ignore the suite's baseline (e.g. to write a new one)"),
    max_regression: Optional[str] = typer.Option(None, "--max-regression", help="Allowed rise of latency/teacher ratio (default: 15%)"),
    max_fidelity_drop: Optional[float] = typer.Option(None, "--max-fidelity-drop", min=0.0, help="Allowed absolute fidelity drop (default: 0.01)"),
) -> None:
    """Measure artifacts against their teacher: latency, memory, size, fidelity; gate on a baseline."""
    import os

    from edgedistill.artifact import write_json
    from edgedistill.bench.gate import compare, gate_markdown, load_baseline, parse_percent
    from edgedistill.bench.results import github_benchmark_entries, markdown_table
    from edgedistill.bench.runner import BenchSettings, run_bench
    from edgedistill.bench.suite import BenchSuite, load_suite

    try:
        cfg = load_suite(suite) if suite else None
        if cfg is None:
            if not artifacts:
                raise EdgeDistillError("no artifact directories given", hint="pass OUT/<target> directories or --suite FILE")
            cfg = BenchSuite(name="cli", artifacts=[str(a) for a in artifacts])
        overrides = {"artifacts": [str(a) for a in artifacts] if artifacts else None, "teacher": teacher, "data": data,
                     "runtimes": [x.strip() for r in runtime for x in r.split(",") if x.strip()] if runtime else None,
                     "threads": threads, "sequence": seq, "held_out": held_out, "min_time_s": min_time,
                     "rounds": rounds, "batches": _parse_batches(batch) if batch else None, "memory": False if no_memory else None,
                     "baseline": str(baseline) if baseline else None, "max_regression": max_regression,
                     "max_fidelity_drop": max_fidelity_drop, "json_out": json_out and str(json_out),
                     "markdown_out": markdown_out and str(markdown_out), "html_out": html_out and str(html_out),
                     "github_benchmark_out": github_out and str(github_out)}
        cfg = cfg.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        if no_baseline:
            cfg = cfg.model_copy(update={"baseline": None})
        limit = parse_percent(cfg.max_regression)
        base = load_baseline(Path(cfg.baseline)) if cfg.baseline else None  # fail before measuring
        result = run_bench([Path(a) for a in cfg.artifacts], cfg.teacher, cfg.data,
                           BenchSettings(runtimes=cfg.runtimes, threads=cfg.threads, batches=cfg.batches,
                                         sequence=cfg.sequence, held_out=cfg.held_out, min_time_s=cfg.min_time_s,
                                         rounds=cfg.rounds, memory=cfg.memory))
    except EdgeDistillError as e:
        fail(e)
    table = markdown_table(result)
    summary = [f"## edgedistill bench{': ' + cfg.name if suite else ''}", "", table]
    if cfg.json_out:
        Path(cfg.json_out).write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    if cfg.github_benchmark_out:
        write_json(Path(cfg.github_benchmark_out), github_benchmark_entries(result))
    if cfg.html_out:
        from edgedistill.bench.html import render_html

        Path(cfg.html_out).write_text(render_html(result), encoding="utf-8")
    regressed = False
    if base is not None:
        rows = compare(result, base, limit, cfg.max_fidelity_drop)
        regressed = any(r.regressed for r in rows)
        verdict = "REGRESSED" if regressed else "no regression"
        summary += [f"### Gate vs {cfg.baseline}: {verdict}", "", gate_markdown(rows)]
    text = "\n".join(summary)
    if cfg.markdown_out:
        Path(cfg.markdown_out).write_text(text, encoding="utf-8")
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as f:
            f.write(text + "\n")
    sys.stdout.write(text + "\n")
    if regressed:
        err.print("[bold red]regression:[/] see the gate table above", highlight=False)
        raise typer.Exit(1)


@app.command("generate")
def generate_cmd(
    artifact_dir: Path = typer.Argument(..., help="An OUT/<target> directory holding a causal-LM artifact"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy; above 0 samples"),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k most likely tokens (0 = all)"),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads (default: the profile's, capped at the cores)"),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template (instruct teachers)"),
) -> None:
    """Stream tokens from a causal-LM artifact with onnxruntime alone (its KV cache, greedy or sampling)."""
    from edgedistill.generate import open_artifact, stream

    try:
        lm = open_artifact(artifact_dir, threads)
        pieces = stream(lm, prompt, max_new_tokens, temperature, top_k, top_p, seed, chat)
        first = True
        for piece in pieces:
            if first:
                first = False
            sys.stdout.write(piece)
            sys.stdout.flush()
    except EdgeDistillError as e:
        fail(e)
    sys.stdout.write("\n")
    stats = lm.last_stats
    if stats:
        err.print(f"[dim]{stats['new_tokens']} tokens, prefill {stats['prefill_ms']:.1f} ms for {stats['prompt_tokens']} "
                  f"prompt tokens, {stats['decode_tokens_per_s']:.1f} tokens/s decoding[/]", highlight=False)


def _parse_batches(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise EdgeDistillError(f"--batch {text!r} is not a list of positive integers", hint="write it like 1,8")
    return values


if __name__ == "__main__":
    app()
