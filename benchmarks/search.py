"""The student search on MiniLM: `compile --search` under a time budget vs the plain default compile.

Runs, as a user would, `edgedistill compile minilm --search --time-budget B` and the default compile (3 layers; a
cache hit when the search trained that shape to the end), then benches both artifacts beside the teacher in one
interleaved run (`edgedistill bench`, the same held-out texts and threads). Prints every evaluation of the search,
its front, and whether its choice dominates or equals the default.

    python benchmarks/search.py [--time-budget 20m] [--max-texts N] [--epochs 2] [--out build/student-search]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

BIN = Path(sys.executable).parent


def run(args: list[str]) -> float:
    start = time.monotonic()
    code = subprocess.call([str(BIN / "edgedistill"), *args])
    if code not in (0, 2):  # 2: a rejected artifact, which is still reported
        raise SystemExit(f"edgedistill {' '.join(args)} failed with exit code {code}")
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-budget", default="20m")
    ap.add_argument("--max-texts", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--target", default="x86-64-avx512")
    ap.add_argument("--out", type=Path, default=Path("build/student-search"))
    a = ap.parse_args()
    common = ["--target", a.target, "--epochs", str(a.epochs)] + ([] if a.max_texts is None else ["--max-texts", str(a.max_texts)])
    search_s = run(["compile", "minilm", *common, "--search", "--time-budget", a.time_budget, "--out", str(a.out / "search")])
    default_s = run(["compile", "minilm", *common, "--out", str(a.out / "default")])
    chosen, default = a.out / "search" / a.target, a.out / "default" / a.target
    if not chosen.is_dir():
        print((a.out / "search" / f"{a.target}.rejected.md").read_text())
        return 1
    record = json.loads((chosen / "manifest.json").read_text())["search"]
    console = Console(width=160)
    table = Table(title=f"search: {record['elapsed_s'] / 60:.1f} of {record['time_budget_s'] / 60:.0f} min "
                        f"(wall {search_s / 60:.1f} min with labelling); default compile {default_s / 60:.1f} min")
    for col in ("student", "recipe", "rung", "steps", "fidelity", "latency ms", "MB", "front"):
        table.add_column(col)
    for e in record["evaluations"]:
        table.add_row(e["label"], e["recipe"], str(e["rung"] + 1), f"{e['steps']}/{e['total_steps']}",
                      f"{e['fidelity']:.4f}", "-" if e["latency_ms"] is None else f"{e['latency_ms']:.2f}",
                      f"{e['size_mb']:.2f}", "yes" if e["on_front"] and e["latest"] else "")
    console.print(table)
    front = [e for e in record["evaluations"] if e["on_front"] and e["latest"]]
    console.print(f"front: {len(front)} non-dominated points; chosen: {record['chosen']['label']}, "
                  f"{record['chosen']['recipe']}")
    # both artifacts and the teacher, interleaved in one run: the bench prints latency and fidelity ratios
    run(["bench", str(chosen), str(default), "--batch", "1", "--threads", "2", "--no-memory",
         "--markdown", str(a.out / "bench.md")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
