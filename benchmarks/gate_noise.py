"""The CI gate's false-positive rate and its sensitivity, measured: the same artifact timed against the teacher in
N unchanged rounds, beside a copy of it slowed by a planted factor, each round the way `edgedistill bench` times one
(8 rotating held-out batches padded to seq 128; teacher, artifact and planted copy interleaved in ~0.2 s blocks;
ratio = median of paired block-median ratios). A gate decision compares the median ratio of k rounds with a baseline's median of k other rounds
(k = 1, 3, 5; drawn at random from the N measured, 4,000 draws): an unchanged pair flagged is a false positive, a
planted one not flagged is a miss.

The planted copy runs the artifact, then spins on the calling thread until `--slowdown` times the call's own
duration has passed: a pure, known regression (a real one, a lost fusion or a de-quantized layer, costs 2x or more).

    python benchmarks/gate_noise.py --artifact build/ci/ci-x86 --runs 20 --threads 1 2
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from edgedistill.artifact import verify_files
from edgedistill.bench.timer import measure_interleaved, paired_ratio
from edgedistill.data import BUILTIN_SETS, builtin_texts
from edgedistill.runtimes.registry import RUNTIMES
from edgedistill.teachers import load_teacher

SEQ = 128


def planted(run, factor: float):
    def slow(feeds):
        t0 = time.perf_counter()
        out = run(feeds)
        end = t0 + factor * (time.perf_counter() - t0)
        while time.perf_counter() < end:
            pass
        return out

    return slow


def bootstrap_low(block_ratios: list[float], q: float = 0.05, n: int = 2000) -> float:
    """The q-quantile of the bootstrapped median of the per-block ratios (a one-sided lower confidence bound)."""
    rng = np.random.default_rng(0)
    r = np.asarray(block_ratios)
    medians = np.median(r[rng.integers(0, len(r), (n, len(r)))], axis=1)
    return float(np.quantile(medians, q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=Path("build/ci/ci-x86"))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--slowdown", type=float, default=1.3)
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds per shape, as the CI suite's min_time_s")
    ap.add_argument("--limits", type=float, nargs="+", default=[0.10, 0.15, 0.20, 0.25])
    ap.add_argument("--rounds", type=int, nargs="+", default=[1, 3, 5], help="rounds a gate decision takes the median of")
    args = ap.parse_args()
    console = Console(width=150)
    manifest = verify_files(args.artifact)
    teacher = load_teacher(manifest.teacher["name"] if Path(manifest.teacher["name"]).exists() else "minilm")
    source = manifest.data["source"] if manifest.data["source"] in BUILTIN_SETS else "builtin:varied"
    used = manifest.data["num_texts"] if manifest.data["source"] == source else 0
    texts = builtin_texts(source, used + 64)[used:]
    tok, names = teacher.tokenizer, teacher.family.input_names(teacher.tokenizer)
    model = RUNTIMES["ort-cpu"].model_file(args.artifact, list(manifest.files))
    rows = {}  # (threads, batch) -> list of (unchanged ratio, planted ratio, unchanged block ratios, planted blocks)
    for threads in args.threads:
        torch.set_num_threads(threads)
        run, _ = RUNTIMES["ort-cpu"].load(model, threads)

        def teacher_run(feeds):
            with torch.inference_mode():
                return teacher.module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()

        for batch in args.batches:
            inputs = []
            for i in range(8):
                chunk = [texts[(i * batch + j) % len(texts)] for j in range(batch)]
                enc = tok(chunk, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
                inputs.append({k: enc[k].astype(np.int64) for k in names})
            out = rows.setdefault((threads, batch), [])
            for k in range(args.runs):
                stats = measure_interleaved({"teacher": (teacher_run, inputs), "artifact": (run, inputs),
                                             "planted": (planted(run, args.slowdown), inputs)}, min_time_s=args.min_time)
                t, a, p = (stats[n].block_p50_ms for n in ("teacher", "artifact", "planted"))
                out.append((paired_ratio(a, t), paired_ratio(p, t), [x / y for x, y in zip(a, t)],
                            [x / y for x, y in zip(p, t)]))
                console.print(f"threads {threads} batch {batch} run {k + 1}/{args.runs}: ratio {out[-1][0]:.4f}, "
                              f"planted {out[-1][1]:.4f} ({len(t)} blocks)")

    table = Table(title=f"The gate on {args.runs} unchanged rounds and a planted {args.slowdown}x slowdown "
                        f"({args.min_time:g} s of interleaved timing per shape and round)")
    for col in ("threads", "batch", "ratio median", "spread (max/min)", "rule", "limit", "false positives",
                "planted caught"):
        table.add_column(col, justify="left" if col == "rule" else "right")
    rng = np.random.default_rng(0)
    for (threads, batch), runs in rows.items():
        ratios = np.array([r[0] for r in runs])
        slowed = np.array([r[1] for r in runs])
        spread = f"{ratios.max() / ratios.min():.3f}"
        for k in args.rounds:
            # baseline and current each the median of k rounds, drawn without overlap from the measured ones
            draws = [rng.permutation(len(runs)) for _ in range(4000)] if 2 * k <= len(runs) else []
            for limit in args.limits:
                if not draws:
                    continue
                fp = np.mean([np.median(ratios[d[k:2 * k]]) / np.median(ratios[d[:k]]) - 1 > limit for d in draws])
                caught = np.mean([np.median(slowed[d[k:2 * k]]) / np.median(ratios[d[:k]]) - 1 > limit for d in draws])
                table.add_row(str(threads), str(batch), f"{np.median(ratios):.4f}", spread,
                              f"median of {k} round{'s' if k > 1 else ''}", f"{limit:.0%}", f"{fp:.1%}", f"{caught:.1%}")
        pairs = list(itertools.permutations(range(len(runs)), 2))
        for limit in args.limits:  # measured and not kept: a bootstrap bound over one round's few blocks
            fp = sum(bootstrap_low(runs[j][2]) / runs[i][0] - 1 > limit for i, j in pairs) / len(pairs)
            caught = sum(bootstrap_low(runs[j][3]) / runs[i][0] - 1 > limit for i, j in pairs) / len(pairs)
            table.add_row(str(threads), str(batch), f"{np.median(ratios):.4f}", spread,
                          "one round, lower 95% bootstrap bound", f"{limit:.0%}", f"{fp:.1%}", f"{caught:.1%}")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
