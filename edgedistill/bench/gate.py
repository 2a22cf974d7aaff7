"""The CI gate: compare a bench result with a stored baseline; latency as ratios to the teacher measured in the same
run (so the machine's speed cancels out), fidelity as absolute drops."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from edgedistill.bench.results import SCHEMA_VERSION, BenchResult
from edgedistill.errors import EdgeDistillError

# fidelity metrics the gate holds (higher is better); others (cosine_min, kl_mean...) are reported, not gated
GATED_FIDELITY = ("cosine_mean", "top1_agreement", "accuracy", "retrieval_agreement_at_10")


@dataclass
class GateRow:
    """One comparison: a model's metric now vs in the baseline, and whether it regressed past the limit."""

    model: str
    runtime: str
    metric: str
    baseline: float | None
    current: float | None
    change: str
    limit: str
    regressed: bool


def parse_percent(text: str) -> float:
    """Return '10%' or '0.1' as the fraction 0.1."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise EdgeDistillError(f"--max-regression {text!r} is not a percentage", hint="write it like 10%") from None
    if value < 0:
        raise EdgeDistillError(f"--max-regression {text!r} is negative", hint="write it like 10%")
    return value


def load_baseline(path: Path) -> BenchResult:
    """Return the stored bench result at `path`, or raise EdgeDistillError."""
    if not path.is_file():
        raise EdgeDistillError(f"baseline {path} does not exist", hint="write one with `edgedistill bench ... --json PATH`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeDistillError(f"baseline {path} is not JSON: {e}", hint="pass a file written by `edgedistill bench --json`") from None
    if isinstance(raw, dict) and raw.get("schema_version") != SCHEMA_VERSION:
        raise EdgeDistillError(f"baseline {path} has schema version {raw.get('schema_version')}, this edgedistill reads "
                               f"{SCHEMA_VERSION}", hint="regenerate the baseline with this version")
    try:
        baseline = BenchResult.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise EdgeDistillError(f"baseline {path} is not an edgedistill bench result (field "
                               f"'{'.'.join(str(p) for p in err['loc'])}': {err['msg']})",
                               hint="pass a file written by `edgedistill bench --json`") from None
    return baseline


def compare(current: BenchResult, baseline: BenchResult, max_latency_regression: float,
            max_fidelity_drop: float) -> list[GateRow]:
    """Return one row per (artifact, runtime, shape) latency ratio and per gated fidelity metric."""
    rows = []
    base = {(r.name, r.runtime): r for r in baseline.results if r.role == "artifact" and r.status == "measured"}
    # latency ratios compare only on the same instruction sets (measured: this ratio read 0.18 on an AVX-512 VNNI
    # EPYC and 0.27 on an AVX2 one, the same artifact): elsewhere the latency rows say why they are not compared
    isa_now, isa_base = current.machine.get("cpu_isa"), baseline.machine.get("cpu_isa")
    other_cpu = None if isa_now is None or isa_base is None or isa_now == isa_base else (
        f"not compared: the baseline's CPU has {', '.join(isa_base) or 'none'} of the int8-relevant instruction "
        f"sets, this one {', '.join(isa_now) or 'none'}")
    seen = set()
    for r in current.results:
        if r.role != "artifact" or r.status != "measured":
            continue
        b = base.get((r.name, r.runtime))
        seen.add((r.name, r.runtime))
        if b is None:
            rows.append(GateRow(r.name, r.runtime, "(new: no baseline)", None, None, "", "", False))
            continue
        for key, ratio in r.ratio_to_teacher.items():
            if key in b.ratio_to_teacher and other_cpu:
                rows.append(GateRow(r.name, r.runtime, f"latency/teacher {key}", b.ratio_to_teacher[key], ratio,
                                    other_cpu, "", False))
            elif key in b.ratio_to_teacher:
                change = ratio / b.ratio_to_teacher[key] - 1
                rows.append(GateRow(r.name, r.runtime, f"latency/teacher {key}", b.ratio_to_teacher[key], ratio,
                                    f"{change:+.1%}", f"≤ +{max_latency_regression:.0%}", change > max_latency_regression))
        for metric in GATED_FIDELITY:
            if metric in r.accuracy and metric in b.accuracy:
                drop = b.accuracy[metric] - r.accuracy[metric]
                rows.append(GateRow(r.name, r.runtime, metric, b.accuracy[metric], r.accuracy[metric], f"{-drop:+.4f}",
                                    f"≥ -{max_fidelity_drop:.4f}", drop > max_fidelity_drop))
    for name, runtime in base.keys() - seen:
        rows.append(GateRow(name, runtime, "(missing from this run)", None, None, "", "", True))
    return rows


def gate_markdown(rows: list[GateRow]) -> str:
    """Return the comparison as a markdown table, regressions marked."""
    lines = ["| model | runtime | metric | baseline | current | change | limit | verdict |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r.model} | {r.runtime} | {r.metric} | {fmt(r.baseline)} | {fmt(r.current)} | {r.change} | "
                     f"{r.limit} | {'**REGRESSED**' if r.regressed else 'ok'} |")
    return "\n".join(lines) + "\n"
