"""Trust in the harness itself, measured: (1) the timer's own overhead per run, against a 3 ms model;
(2) two consecutive `bench` runs of one artifact agree on its latency ratio to the teacher.

    python benchmarks/harness.py --artifact build/x86-64-avx512 [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgedistill.bench.runner import BenchSettings, run_bench
from edgedistill.bench.timer import measure


def busy_wait(ms: float):
    def fn(_x) -> None:
        end = time.perf_counter() + ms / 1000
        while time.perf_counter() < end:
            pass
    return fn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=Path("build/x86-64-avx512"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    console = Console(width=140)

    inputs = list(range(8))
    noop = measure(lambda x: None, inputs, min_runs=10000, max_runs=10000)
    three = measure(busy_wait(3.0), inputs, min_runs=300, max_runs=300)
    t = Table(title="Timer overhead per measured run (what measure() adds around the call)")
    for c in ("workload", "p50", "overhead vs a 3 ms model"):
        t.add_column(c)
    t.add_row("no-op call (pure harness cost)", f"{noop.p50_ms * 1000:.2f} µs", f"{noop.p50_ms / 3.0:.3%}")
    t.add_row("3.000 ms busy-wait", f"{three.p50_ms:.4f} ms", f"{(three.p50_ms - 3.0) / 3.0:+.3%}")
    console.print(t)

    runs = []
    for _ in range(2):
        result = run_bench([args.artifact], None, None, BenchSettings(threads=args.threads, memory=False))
        runs.append(next(r for r in result.results if r.role == "artifact").ratio_to_teacher)
    t = Table(title=f"Two consecutive bench runs of {args.artifact}: artifact p50 / teacher p50, {args.threads} threads")
    for c in ("shape", "run 1", "run 2", "difference"):
        t.add_column(c)
    worst = 0.0
    for key in runs[0]:
        diff = runs[1][key] / runs[0][key] - 1
        worst = max(worst, abs(diff))
        t.add_row(key, f"{runs[0][key]:.4f}", f"{runs[1][key]:.4f}", f"{diff:+.1%}")
    console.print(t)
    ok = noop.p50_ms / 3.0 <= 0.05 and worst <= 0.10
    console.print(f"{'[green]met[/]' if ok else '[red]MISSED[/]'}: overhead ≤ 5% of 3 ms and runs agree within 10% (worst {worst:.1%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
