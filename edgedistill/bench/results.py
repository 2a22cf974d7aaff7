"""The benchmark result schema (versioned JSON), and its views: markdown, github-action-benchmark entries."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class ShapeLatency(BaseModel):
    """Latency of one model at one (batch, sequence, threads), in ms, over `runs` timed runs."""

    model_config = ConfigDict(extra="forbid")
    phase: str | None = Field(None, description="language models: prefill (sequence = prompt tokens) or generate "
                                                "(sequence = new tokens); None for encoders")
    batch: int
    sequence: int
    threads: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    stdev_ms: float
    runs: int
    throughput_items_s: float
    samples_ms: list[float] = Field(default_factory=list, description="every timed run, in order")

    @property
    def key(self) -> str:
        key = shape_key(self.batch, self.sequence, self.threads)
        return f"{self.phase}_{key}" if self.phase else key


def shape_key(batch: int, sequence: int, threads: int) -> str:
    return f"b{batch}_s{sequence}_t{threads}"


class ModelResult(BaseModel):
    """One model (the teacher or an artifact) on one runtime."""

    model_config = ConfigDict(extra="forbid")
    name: str
    role: Literal["teacher", "artifact", "peer"]
    runtime: str
    artifact_dir: str | None = None
    model_file: str | None = None
    model_size_mb: float | None = None
    status: Literal["measured", "not measured"] = "measured"
    reason: str | None = None
    latency: list[ShapeLatency] = Field(default_factory=list)
    ratio_to_teacher: dict[str, float] = Field(
        default_factory=dict, description="latency / teacher latency per shape key: the median over timing rounds of "
                                          "each round's median of paired (interleaved) block ratios")
    ratio_rounds: dict[str, list[float]] = Field(default_factory=dict, description="each round's ratio, per shape key")
    peak_rss_mb: float | None = None
    rss_growth_mb: float | None = Field(None, description="peak RSS minus RSS after imports: session + runs")
    runtime_settings: dict = Field(default_factory=dict)
    accuracy: dict[str, float] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list, description="what could not be measured for a measured model, and why")


class BenchResult(BaseModel):
    """A whole `edgedistill bench` run."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    created_utc: str
    machine: dict
    teacher: dict
    data: dict
    settings: dict
    results: list[ModelResult]


def github_benchmark_entries(result: BenchResult) -> list[dict]:
    """Return the github-action-benchmark "customSmallerIsBetter" list: p50 latency and ratio per model and shape."""
    entries = []
    for r in result.results:
        if r.status != "measured":
            continue
        for lat in r.latency:
            entries.append({"name": f"{r.name} [{r.runtime}] {lat.key} p50", "unit": "ms", "value": round(lat.p50_ms, 4),
                            "range": f"± {lat.stdev_ms:.3f}"})
            if r.role == "artifact" and lat.key in r.ratio_to_teacher:
                entries.append({"name": f"{r.name} [{r.runtime}] {lat.key} latency / teacher", "unit": "ratio",
                                "value": round(r.ratio_to_teacher[lat.key], 4)})
    return entries


def markdown_table(result: BenchResult) -> str:
    """Return a markdown table: one row per model and runtime, p50 per shape with its ratio to the teacher."""
    keys = sorted({lat.key for r in result.results for lat in r.latency})
    head = ["model", "runtime", *[f"p50 ms {k}" for k in keys], "size MB", "peak RSS MB", "fidelity vs teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.results:
        if r.status != "measured":
            lines.append(f"| {r.name} | {r.runtime} | " + " | ".join(["—"] * len(keys)) + f" | — | — | not measured: {r.reason} |")
            continue
        by_key = {lat.key: lat for lat in r.latency}
        cells = []
        for k in keys:
            lat = by_key.get(k)
            ratio = f" ({1 / r.ratio_to_teacher[k]:.1f}× faster)" if r.role == "artifact" and k in r.ratio_to_teacher else ""
            cells.append(f"{lat.p50_ms:.2f}{ratio}" if lat else "—")
        acc = ", ".join(f"{k} {v:.4f}" for k, v in r.accuracy.items()) or "(reference)"
        size = f"{r.model_size_mb:.1f}" if r.model_size_mb is not None else "—"
        rss = f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb is not None else "—"
        lines.append(f"| {r.name} | {r.runtime} | " + " | ".join(cells) + f" | {size} | {rss} | {acc} |")
    return "\n".join(lines) + "\n"
