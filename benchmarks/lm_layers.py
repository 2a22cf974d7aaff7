"""Which layers should a causal-LM student keep? Perplexity on held-out windows of the built-in transfer set,
before any training, of students that keep N of the teacher's layers chosen by each criterion.

    python benchmarks/lm_layers.py [--teacher smollm2] [--keep 20 15] [--calibration 4]

Criteria: even (evenly spaced, first and last kept), block-influence (ShortGPT: drop the layers whose output is most
like their input, in one shot), perplexity (greedy: drop, one at a time, the layer whose removal raises the
calibration windows' perplexity least). Calibration windows come from the training split, scores from held-out ones.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edgedistill.data import load_transfer_set, split_indices  # noqa: E402
from edgedistill.families.causal_lm import derive_student, select_layers, window_perplexity  # noqa: E402
from edgedistill.families.causal_lm_stages import tokenize_windows  # noqa: E402
from edgedistill.teachers import load_teacher  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--keep", type=int, nargs="+", default=[20, 15])
    ap.add_argument("--calibration", type=int, default=4, help="calibration windows")
    ap.add_argument("--eval", type=int, default=16, help="held-out windows scored")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--criteria", nargs="+", default=["even", "block-influence", "perplexity"])
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    teacher = load_teacher(args.teacher)
    windows = tokenize_windows(teacher, load_transfer_set(None, "text", "label", None, None), args.window)
    train_idx, val_idx = split_indices(len(windows), 0.05, 0)
    calib = torch.from_numpy(windows[train_idx[: args.calibration]].astype(np.int64))
    held = torch.from_numpy(windows[val_idx[: args.eval]].astype(np.int64))
    base = window_perplexity(teacher.module, held)
    table = Table(title=f"{args.teacher}: held-out perplexity before training ({args.eval} windows x {args.window} "
                        f"tokens; teacher {base:.1f}; {args.calibration} calibration windows)")
    for col in ("kept layers", "criterion", "perplexity", "x teacher", "selection s", "kept"):
        table.add_column(col)
    total = teacher.family.num_layers(teacher.config)
    for keep in args.keep:
        for criterion in args.criteria:
            t0 = time.perf_counter()
            kept, _ = select_layers(teacher.module, teacher.family.decoder, keep, calib, criterion)
            seconds = time.perf_counter() - t0
            student = derive_student(teacher.module, teacher.family.decoder, kept)
            ppl = window_perplexity(student, held)
            table.add_row(f"{keep} of {total}", criterion, f"{ppl:,.1f}", f"{ppl / base:,.2f}", f"{seconds:.0f}",
                          " ".join(map(str, sorted(set(range(total)) - set(kept)))) + " dropped")
            Console().print(f"{keep} {criterion}: {ppl:,.1f} ({seconds:.0f} s)")
            del student
    Console(width=160).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
