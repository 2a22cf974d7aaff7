"""Benchmark suites: a YAML file naming artifacts, teacher, data, runtimes, shapes, baseline and outputs."""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgedistill.errors import EdgeDistillError


class BenchSuite(BaseModel):
    """A suite. Paths are relative to the directory `edgedistill bench` runs in."""

    model_config = ConfigDict(extra="forbid")
    name: str
    artifacts: list[str] = Field(min_length=1)
    teacher: str | None = None
    data: str | None = None
    runtimes: list[str] | None = Field(None, description="None: each artifact in its own target's runtime")
    threads: int | None = Field(None, ge=1)
    batches: list[int] = Field(default_factory=lambda: [1, 8])
    sequence: int = Field(128, ge=1)
    held_out: int = Field(500, ge=2)
    min_time_s: float = Field(3.0, gt=0, description="timing time per shape and round, all models interleaved")
    rounds: int = Field(5, ge=1, description="timing rounds per shape; the ratio to the teacher is their median "
                                             "(README, 'A gate you can trust')")
    memory: bool = True
    baseline: str | None = None
    max_regression: str = "15%"
    max_fidelity_drop: float = Field(0.01, ge=0)
    json_out: str | None = None
    markdown_out: str | None = None
    html_out: str | None = None
    github_benchmark_out: str | None = None


def load_suite(path: Path) -> BenchSuite:
    """Return the suite in a YAML file, or raise EdgeDistillError naming the bad field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise EdgeDistillError(f"cannot read suite {path}: {e.strerror}", hint="pass --suite PATH to a YAML file") from None
    except yaml.YAMLError as e:
        raise EdgeDistillError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    try:
        return BenchSuite.model_validate(raw)
    except ValidationError as e:
        # an unknown key (a typo) explains the other errors better than the missing field it was meant to be
        first = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise EdgeDistillError(f"{path}: field '{field}': {first['msg']}", hint="see benchmarks/ci.yaml for an example") from None
