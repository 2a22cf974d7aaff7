"""The `edgedistill` command: parses arguments, calls the pipeline, turns user errors into one red line + exit 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edgedistill.errors import BudgetError, EdgeDistillError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Distill, quantize and verify a teacher model into a device artifact per target.")
targets_app = typer.Typer(help="List, show and describe target profiles.", pretty_exceptions_enable=False)
app.add_typer(targets_app, name="targets")
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)


def fail(e: EdgeDistillError) -> None:
    err.print(f"[bold red]error:[/] {e.message}" + (f" [dim](hint: {e.hint})[/]" if e.hint else ""), highlight=False,
              soft_wrap=True)
    raise typer.Exit(2)


@app.command("compile")
def compile_cmd(
    teacher: Optional[str] = typer.Argument(None, help="Model directory (HF or sentence-transformers) or 'minilm' (default: minilm)"),
    data: Optional[str] = typer.Option(None, "--data", help=".txt (a text per line), .jsonl or .csv (default: built-in English set)"),
    target: Optional[list[str]] = typer.Option(None, "--target", help="Profile name or YAML path; repeat for several (default: this CPU)"),
    out_dir: Path = typer.Option(Path("build"), "--out", help="Artifacts go to OUT/<target>/"),
    task: Optional[str] = typer.Option(None, "--task", help="feature-extraction | text-classification (default: from the checkpoint)"),
    student_layers: Optional[int] = typer.Option(None, "--student-layers", help="Student depth (default: half the teacher's)"),
    epochs: int = typer.Option(2, "--epochs", min=1),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    lr: float = typer.Option(3e-4, "--lr", min=0.0),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=8, help="Tokens per text (default: the teacher's)"),
    max_texts: Optional[int] = typer.Option(None, "--max-texts", min=2, help="Use only the first N texts of the data"),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="Held-out share for validation (at most 2000 texts)"),
    seed: int = typer.Option(0, "--seed"),
    text_column: str = typer.Option("text", "--text-column", help="JSONL field / CSV column holding the text"),
    label_column: str = typer.Option("label", "--label-column", help="JSONL field / CSV column holding the label"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Teacher-output cache (default: ~/.cache/edgedistill)"),
) -> None:
    """Compile TEACHER into a distilled, quantized, validated artifact for each --target."""
    from edgedistill.distill.loop import DistillConfig
    from edgedistill.pipeline import CompileOptions, compile

    if task not in (None, "feature-extraction", "text-classification"):
        fail(EdgeDistillError(f"unknown task '{task}'", hint="use feature-extraction or text-classification"))
    opts = CompileOptions(task=task, student_layers=student_layers, max_length=max_length, val_fraction=val_fraction,
                          max_texts=max_texts, text_column=text_column, label_column=label_column, cache_dir=cache_dir,
                          distill=DistillConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed))
    try:
        results = compile(teacher, data, target or [], out_dir, opts).targets
    except EdgeDistillError as e:
        fail(e)
    table = Table(title="edgedistill compile")
    table.add_column("", no_wrap=True)
    for r in results:
        table.add_column(r.profile.name, overflow="fold")
    rows = {"status": [], "fidelity vs teacher": [], "latency p50 vs teacher": [], "size vs teacher": [], "artifact": []}
    for r in results:
        m, lat = r.manifest, r.manifest.latency
        metric = "cosine_mean" if m.teacher["task"] == "feature-extraction" else "top1_agreement"
        rows["status"].append("[green]pass[/]" if r.published else "[red]FAIL[/]")
        rows["fidelity vs teacher"].append(f"{metric} {m.metrics['values'][metric]:.4f}")
        rows["latency p50 vs teacher"].append(f"{lat['artifact']['p50_ms']:.2f} vs {lat['teacher_torch_fp32']['p50_ms']:.2f} ms "
                                             f"({lat['speedup_vs_teacher']:.1f}x faster, {lat['threads_measured']} threads)")
        rows["size vs teacher"].append(f"{m.sizes['model_mb']:.1f} vs {m.sizes['teacher_weights_mb']:.1f} MB ({m.sizes['size_ratio']:.0%})")
        rows["artifact"].append(str(r.path))
    for name, cells in rows.items():
        table.add_row(name, *cells)
    out.print(table)
    failed = [r for r in results if not r.published]
    if failed:
        fail(BudgetError("; ".join(f"{r.profile.name}: {r.manifest.metrics['verdict']}" for r in failed),
                         hint="see the .rejected.md report; try more --epochs, more --data or more --student-layers"))


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
    for col in ("provider", "threads", "quantization", "min cosine", "min top-1"):
        table.add_column(col)
    for p in profiles.values():
        table.add_row(p.name + (" (this CPU)" if p.name == detected else ""), p.execution_provider, str(p.threads),
                      p.quantization.recipe, str(p.accuracy_budget.min_cosine), str(p.accuracy_budget.min_top1_agreement))
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
def verify_cmd(artifact_dir: Path = typer.Argument(..., help="An OUT/<target> directory")) -> None:
    """Check that every file of an artifact matches the sha256 in its manifest."""
    from edgedistill.artifact import verify_files

    try:
        manifest = verify_files(artifact_dir)
    except EdgeDistillError as e:
        fail(e)
    out.print(f"[green]ok[/]: {len(manifest.files)} files match {artifact_dir}/manifest.json")


if __name__ == "__main__":
    app()
