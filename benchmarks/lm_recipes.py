"""Causal-LM recipe evidence, measured on the real teacher (SmolLM2-135M by default):

    python benchmarks/lm_recipes.py labels   # k of the soft-label cache, and the divergence, by student quality
    python benchmarks/lm_recipes.py int4     # MatMulNBits block size / symmetry / accuracy level / embeddings
    python benchmarks/lm_recipes.py generate # teacher-written windows (--generate) vs real ones, same steps
    python benchmarks/lm_recipes.py width    # depth vs FFN width (--ffn-ratio) at about equal parameters

labels: one student (block-influence layers), the same windows, steps, seed and learning rate; only what the loss
sees changes: the teacher's top-k + tail for k in --ks, or its full distribution (computed on the fly, the "no cache"
reference), and forward KL vs reverse KL vs JSD(0.5) at the chosen k. Scored on held-out windows: perplexity and
top-1 agreement with the teacher. Cache bytes per token beside each.

generate: one student, the same steps, seed and held-out windows; the training windows are all real text, or half
real and half written by the teacher (sampled continuations of 16-token prompts taken from the real half), or the
real half twice as long (the real windows plus as many more real ones: what more data would give instead).

width: students of about the same parameter count, shallower with full FFNs or deeper with FFNs narrowed by
activation importance (layers by block influence in each), trained alike; perplexity before and after training.

int4: the teacher exported by Optimum with its KV cache, quantized by each setting (LM head and embedding table
included); held-out perplexity vs the fp32 graph, file size, and one-token decode latency at a 128-token context.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edgedistill.data import load_transfer_set, split_indices  # noqa: E402
from edgedistill.distill.loop import DistillConfig, Training, distill  # noqa: E402
from edgedistill.families.causal_lm import (  # noqa: E402
    bytes_per_token,
    derive_student,
    label_dtype,
    select_layers,
    teacher_labels,
    window_perplexity,
)
from edgedistill.families.causal_lm_stages import lm_training, tokenize_windows  # noqa: E402
from edgedistill.teachers import load_teacher  # noqa: E402
from edgedistill.validate import lm_metrics  # noqa: E402

console = Console(width=150)


@torch.no_grad()
def held_out_metrics(logits_of, windows: np.ndarray, labels: np.ndarray) -> dict:
    return lm_metrics(logits_of, windows, labels)


def restrict(labels: np.ndarray, k: int, window: int, vocab: int) -> np.ndarray:
    """Return top-k label rows cut from top-K ones (K >= k): the same top-k, the tail re-summed."""
    out = np.zeros(len(labels), dtype=label_dtype(window, k, vocab))
    out["logp"], out["idx"], out["target"] = labels["logp"][..., :k], labels["idx"][..., :k], labels["target"]
    mass = np.exp(labels["logp"][..., :k].astype(np.float64)).sum(-1)
    out["tail"] = np.log(np.clip(1.0 - mass, 1e-7, None)).astype(np.float32)
    return out


def labels_study(args) -> None:
    teacher = load_teacher(args.teacher)
    vocab = int(teacher.config.vocab_size)
    windows = tokenize_windows(teacher, load_transfer_set(None, "text", "label", None, None), args.window)
    train_idx, val_idx = split_indices(len(windows), 0.05, 0)
    train_idx = train_idx[: args.steps * args.batch_size]
    val_idx = val_idx[: args.eval]
    used = np.concatenate([train_idx, val_idx])
    kmax = max(args.ks)
    t0 = time.perf_counter()
    labels = np.zeros(len(windows), dtype=label_dtype(args.window, kmax, vocab))
    labels[used] = teacher_labels(teacher.module, windows[used], kmax, labels.dtype)
    console.print(f"labelled {len(used) * args.window:,} tokens at k={kmax} in {time.perf_counter() - t0:.0f} s")
    calib = torch.from_numpy(windows[train_idx[:4]].astype(np.int64))
    kept, _ = select_layers(teacher.module, teacher.family.decoder, args.keep, calib, "block-influence")
    cfg = DistillConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, eval_every=10**9, seed=0)
    base_student = derive_student(teacher.module, teacher.family.decoder, kept)
    before = held_out_metrics(lambda w: base_student(input_ids=torch.from_numpy(w)).logits.float().numpy(),
                              windows[val_idx], labels[val_idx])
    runs = [(f"top-{k} + tail", k, "forward-kl") for k in args.ks] + [("full distribution", None, "forward-kl")]
    runs += [(f"top-{args.div_k} + tail", args.div_k, d) for d in ("reverse-kl", "jsd")]
    table = Table(title=f"{args.teacher}: {args.keep}-layer student, {args.steps} steps x {args.batch_size} windows x "
                        f"{args.window} tokens ({args.steps * args.batch_size * args.window:,} tokens), lr {args.lr}; "
                        f"{len(val_idx)} held-out windows; before training: perplexity ratio "
                        f"{before['perplexity_ratio']:.2f}, top-1 {before['top1_agreement']:.3f}")
    for col in ("soft labels", "divergence", "cache B/token", "perplexity", "x teacher", "top-1 agreement",
                "KL(teacher||student)", "train s"):
        table.add_column(col)
    for name, k, divergence in runs:
        student = derive_student(teacher.module, teacher.family.decoder, kept)
        run_cfg = DistillConfig(**{**cfg.__dict__, "divergence": divergence})
        if k is None:
            training = full_training(teacher.module, student, windows, train_idx, val_idx, run_cfg)
            size = vocab * 4
        else:
            rows = restrict(labels, k, args.window, vocab) if k != kmax else labels
            training = lm_training(student, windows, rows, train_idx, val_idx, run_cfg)
            size = bytes_per_token(rows.dtype)
        t0 = time.perf_counter()
        trained = distill(student, training, run_cfg).student
        seconds = time.perf_counter() - t0
        m = held_out_metrics(lambda w: trained(input_ids=torch.from_numpy(w)).logits.float().numpy(), windows[val_idx],
                             labels[val_idx])
        table.add_row(name, divergence, f"{size:,.0f}", f"{m['perplexity']:.2f}", f"{m['perplexity_ratio']:.3f}",
                      f"{m['top1_agreement']:.4f}", f"{m['kl_teacher_topk_mean']:.4f}", f"{seconds:.0f}")
        console.print(f"{name} {divergence}: ratio {m['perplexity_ratio']:.3f}, top-1 {m['top1_agreement']:.4f}")
    console.print(table)


def full_training(teacher_model, student, windows, train_idx, val_idx, cfg) -> Training:
    """The no-cache reference: the teacher's whole distribution, computed on every batch."""
    student.get_input_embeddings().weight.requires_grad_(False)

    def collate(indices):
        return {"input_ids": torch.from_numpy(windows[train_idx[np.asarray(indices)]].astype(np.int64))}

    def loss(model, batch):
        with torch.no_grad():
            logp = torch.log_softmax(teacher_model(input_ids=batch["input_ids"]).logits.float(), -1)
        logq = torch.log_softmax(model(input_ids=batch["input_ids"], use_cache=False).logits.float(), -1)
        return (logp.exp() * (logp - logq)).sum(-1).mean()

    val = torch.from_numpy(windows[val_idx[:32]].astype(np.int64))
    return Training(lengths=[windows.shape[1]] * len(train_idx), collate=collate, loss=loss,
                    evaluate=lambda m: window_perplexity(m.eval(), val), maximize=False)


def generate_study(args) -> None:
    from edgedistill.families.causal_lm import sample_continuations

    teacher = load_teacher(args.teacher)
    vocab = int(teacher.config.vocab_size)
    windows = tokenize_windows(teacher, load_transfer_set(None, "text", "label", None, None), args.window)
    train_idx, val_idx = split_indices(len(windows), 0.05, 0)
    n = args.steps * args.batch_size
    val_idx = val_idx[: args.eval]
    half = train_idx[: n // 2]
    t0 = time.perf_counter()
    written = sample_continuations(teacher.module, windows[half, :16], args.window - 16, seed=0)
    gen_s = time.perf_counter() - t0
    console.print(f"the teacher wrote {len(written)} windows in {gen_s:.0f} s "
                  f"({len(written) * (args.window - 16) / gen_s:.0f} tokens/s)")
    sets = {"real (the first half)": windows[half], "half real + half teacher-written": np.concatenate([windows[half], written]),
            "all real (twice the real text)": windows[train_idx[:n]]}
    labelled = {name: teacher_labels(teacher.module, w, args.div_k, label_dtype(args.window, args.div_k, vocab))
                for name, w in sets.items()}
    val_labels = teacher_labels(teacher.module, windows[val_idx], args.div_k, label_dtype(args.window, args.div_k, vocab))
    calib = torch.from_numpy(windows[train_idx[:4]].astype(np.int64))
    kept, _ = select_layers(teacher.module, teacher.family.decoder, args.keep, calib, "block-influence")
    table = Table(title=f"{args.teacher}: {args.keep}-layer student, {args.steps} steps x {args.batch_size} windows x "
                        f"{args.window} tokens, top-{args.div_k} forward KL, lr {args.lr}; {len(val_idx)} held-out windows")
    for col in ("training windows", "distinct windows", "perplexity × teacher", "top-1 agreement", "KL(teacher||student)"):
        table.add_column(col)
    for name, train in sets.items():
        student = derive_student(teacher.module, teacher.family.decoder, kept)
        both = np.concatenate([train, windows[val_idx]])
        rows = np.concatenate([labelled[name], val_labels])
        tr, va = np.arange(len(train)), np.arange(len(train), len(both))
        cfg = DistillConfig(epochs=max(1, n // len(train)), batch_size=args.batch_size, lr=args.lr, eval_every=10**9, seed=0)
        trained = distill(student, lm_training(student, both, rows, tr, va, cfg), cfg).student
        m = held_out_metrics(lambda w: trained(input_ids=torch.from_numpy(w)).logits.float().numpy(), windows[val_idx],
                             val_labels)
        table.add_row(name, str(len(train)), f"{m['perplexity_ratio']:.3f}", f"{m['top1_agreement']:.4f}",
                      f"{m['kl_teacher_topk_mean']:.4f}")
        console.print(f"{name}: ratio {m['perplexity_ratio']:.3f}")
    console.print(table)


def width_study(args) -> None:
    from edgedistill.families.causal_lm import ffn_importance, ffn_size, prune_ffn
    from edgedistill.teachers.hf import count_parameters

    teacher = load_teacher(args.teacher)
    vocab = int(teacher.config.vocab_size)
    decoder = teacher.family.decoder
    windows = tokenize_windows(teacher, load_transfer_set(None, "text", "label", None, None), args.window)
    train_idx, val_idx = split_indices(len(windows), 0.05, 0)
    train_idx, val_idx = train_idx[: args.steps * args.batch_size], val_idx[: args.eval]
    used = np.concatenate([train_idx, val_idx])
    labels = np.zeros(len(windows), dtype=label_dtype(args.window, args.div_k, vocab))
    labels[used] = teacher_labels(teacher.module, windows[used], args.div_k, labels.dtype)
    calib = torch.from_numpy(windows[train_idx[:4]].astype(np.int64))
    table = Table(title=f"{args.teacher}: {args.steps} steps x {args.batch_size} windows x {args.window} tokens, "
                        f"top-{args.div_k} forward KL, lr {args.lr}; {len(val_idx)} held-out windows")
    for col in ("layers", "FFN", "parameters", "x teacher before", "perplexity x teacher", "top-1 agreement"):
        table.add_column(col)
    for spec in args.shapes:
        depth, ratio = spec.split("x")
        depth, ratio = int(depth), float(ratio)
        kept, _ = select_layers(teacher.module, decoder, depth, calib, "block-influence")
        student = derive_student(teacher.module, decoder, kept)
        width = ffn_size(student.config)
        if ratio < 1:
            keep = int(round(width * ratio / 32)) * 32
            prune_ffn(student, decoder, ffn_importance(student, decoder, calib), keep)
        def score(model):
            return held_out_metrics(lambda w: model(input_ids=torch.from_numpy(w)).logits.float().numpy(),
                                    windows[val_idx], labels[val_idx])
        before = score(student)
        cfg = DistillConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, eval_every=10**9, seed=0)
        trained = distill(student, lm_training(student, windows, labels, train_idx, val_idx, cfg), cfg).student
        m = score(trained)
        table.add_row(str(depth), str(ffn_size(trained.config)), f"{count_parameters(trained):,}",
                      f"{before['perplexity_ratio']:.2f}", f"{m['perplexity_ratio']:.3f}", f"{m['top1_agreement']:.4f}")
        console.print(f"{spec}: {before['perplexity_ratio']:.2f} -> {m['perplexity_ratio']:.3f}")
    console.print(table)


def int4_study(args) -> None:
    from edgedistill.bench.timer import measure_interleaved
    from edgedistill.export_lm import export_causal_lm
    from edgedistill.quantize import quantize
    from edgedistill.quantize.configs import WeightOnlyConfig
    from edgedistill.runtimes.ort_lm import OrtCausalLM

    teacher = load_teacher(args.teacher)
    vocab = int(teacher.config.vocab_size)
    windows = tokenize_windows(teacher, load_transfer_set(None, "text", "label", None, None), args.window)
    _, val_idx = split_indices(len(windows), 0.05, 0)
    held = windows[val_idx[: args.eval]]
    labels = teacher_labels(teacher.module, held, 8, label_dtype(args.window, 8, vocab))
    def cfg(**kw):
        return WeightOnlyConfig(**{"bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4,
                                   "quantize_embeddings": True, "search": False, **kw})

    settings = [("fp32", None),
                ("int4 rtn block 32 sym acc 4", cfg(algorithm="rtn")),
                ("int4 rtn block 32 asym", cfg(algorithm="rtn", symmetric=False)),
                ("int4 rtn block 64", cfg(algorithm="rtn", block_size=64)),
                ("int4 rtn block 32 acc 0", cfg(algorithm="rtn", accuracy_level=0)),
                ("int4 rtn, LM head int8", cfg(algorithm="rtn", int8_nodes=["lm_head"])),
                ("int4 hqq block 32", cfg(algorithm="hqq")),
                ("int4 hqq block 64", cfg(algorithm="hqq", block_size=64)),
                ("int8 rtn block 32", cfg(algorithm="rtn", bits=8))]
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_causal_lm(teacher.module, teacher.tokenizer, Path(tmp) / "export", 21, held[:2])
        models = {}
        for name, cfg in settings:
            models[name] = exported.model if cfg is None else quantize(exported.model, cfg, Path(tmp) / f"{len(models)}.onnx")
        runners = {name: OrtCausalLM(path, args.threads) for name, path in models.items()}
        prompt = held.reshape(-1)[:128].astype(np.int64)[None]
        nxt = held.reshape(-1)[128:129].astype(np.int64)[None]
        pasts = {name: r.forward(prompt)[1] for name, r in runners.items()}
        stats = measure_interleaved({name: ((lambda r, p: lambda _: r.forward(nxt, p))(r, pasts[name]), [0])
                                     for name, r in runners.items()}, warmup=3, min_time_s=10.0, settle=1)
        table = Table(title=f"{args.teacher} exported with its KV cache ({len(held)} held-out windows x {args.window}; "
                            f"decode = one token at a 128-token context, {args.threads} threads)")
        for col in ("weights", "perplexity", "x fp32 graph", "top-1 vs teacher", "MB", "decode ms", "tok/s", "quantized ops"):
            table.add_column(col)
        base = None
        for name, path in models.items():
            m = held_out_metrics(runners[name].logits, held, labels)
            base = base or m["perplexity"]
            import onnx

            ops = {}
            for node in onnx.load(str(path), load_external_data=False).graph.node:
                if node.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMul", "Gather"):
                    ops[node.op_type] = ops.get(node.op_type, 0) + 1
            table.add_row(name, f"{m['perplexity']:.2f}", f"{m['perplexity'] / base:.3f}", f"{m['top1_agreement']:.4f}",
                          f"{path.stat().st_size / 1e6:.1f}", f"{stats[name].p50_ms:.2f}", f"{1000 / stats[name].p50_ms:.1f}",
                          " ".join(f"{k} {v}" for k, v in sorted(ops.items())))
        console.print(table)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=["labels", "int4", "generate", "width"])
    ap.add_argument("--shapes", nargs="+", default=["20x1.0", "24x0.78", "26x0.67"],
                    help="width study: LAYERSxFFN_SHARE students")
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--keep", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--div-k", type=int, default=64)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"labels": labels_study, "int4": int4_study, "generate": generate_study, "width": width_study}[args.study](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
