"""Accuracy-aware static int8 on the real MiniLM teacher: our search (`quantize_within_budget`) vs Intel Neural
Compressor's ONNX tuner (`onnx_neural_compressor.quantization.tuning.autotune`), under the same budget.

Both quantize the same unfused fp32 ONNX export (static QDQ: MatMul-only quantization works best unfused), calibrate on
the same held-in texts and are judged by the same metric on the same held-out texts: mean cosine between the
quantized model's sentence embeddings and the fp32 ONNX model's, onnxruntime CPU, fixed 128-token batches of 8.
INC runs in its own venv (onnx-neural-compressor pins numpy<2): benchmarks/inc_worker.py, fed through npz files.

    .venv/bin/python benchmarks/inc_compare.py [--budget 0.99] [--max-trials 20] [--work build/inc-compare]

Setup of the INC venv (what worked here):
    python3 -m venv .venv-inc
    .venv-inc/bin/pip install "onnx-neural-compressor==1.0" "onnxruntime==1.22.*" "numpy<2" prettytable "scipy<1.15"
(onnx-neural-compressor 1.0 imports prettytable and scipy without declaring them; it needs no torch.)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgedistill.bench.timer import measure_interleaved
from edgedistill.data import load_transfer_set
from edgedistill.export import export_onnx
from edgedistill.quantize import quantize
from edgedistill.quantize.configs import StaticQdqInt8Config
from edgedistill.quantize.search import quantize_within_budget
from edgedistill.runtimes import iter_batches
from edgedistill.runtimes.ort_cpu import cpu_session
from edgedistill.teachers import load_teacher

ROOT = Path(__file__).resolve().parent.parent
SEQ = 128


def save_feeds(path: Path, batches: list[dict[str, np.ndarray]], ref: np.ndarray | None = None) -> None:
    arrays = {f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()}
    if ref is not None:
        arrays["ref"] = ref
    np.savez(path, **arrays)


def session(path: Path, threads: int) -> ort.InferenceSession:
    """Evaluation session; the same options as inc_worker.session (ENABLE_ALL, no spinning)."""
    return cpu_session(path, threads)


def mean_cosine(path: Path, feeds: list[dict[str, np.ndarray]], ref: np.ndarray, threads: int) -> float:
    """The fidelity metric (identical in inc_worker.py): mean cosine of the output rows to the fp32 reference."""
    sess = session(path, threads)
    out = np.concatenate([sess.run(None, f)[0] for f in feeds]).astype(np.float64)
    r = ref.astype(np.float64)
    cos = np.sum(out * r, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(r, axis=1))
    return float(cos.mean())


def size_mb(path: Path) -> float:
    extra = [p for p in path.parent.glob(path.name + ".data")] + [p for p in path.parent.glob(path.name + "_data")]
    return (path.stat().st_size + sum(p.stat().st_size for p in extra)) / 1e6


def count_qdq(path: Path) -> dict[str, int]:
    """Which nodes ended up quantized: MatMuls whose inputs come from DequantizeLinear, and the Q/DQ node counts."""
    g = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    mm = [n for n in g.node if n.op_type == "MatMul"]
    quantized = [n for n in mm if all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                                      for i in n.input)]
    other = sorted({n.op_type for n in g.node
                    if n.op_type not in ("MatMul", "QuantizeLinear", "DequantizeLinear")
                    and any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input)
                    and not all(producer.get(i) is None or producer[i].op_type == "Constant" for i in n.input)})
    inits = {i.name: i for i in g.initializer}
    per_channel = sum(n.op_type == "DequantizeLinear" and len(n.input) > 1 and n.input[1] in inits
                      and int(np.prod(inits[n.input[1]].dims)) > 1 for n in g.node)
    return {"matmul_total": len(mm), "matmul_quantized": len(quantized), "per_channel_dq": per_channel,
            "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in g.node),
            "float_matmuls": [n.name for n in mm if n not in quantized], "other_ops_fed_by_dq": other}


def short_group(name: str) -> str:
    return name.replace("/model/encoder/layer.*/", "").replace("/MatMul", "")


def run_ours(fp32: Path, work: Path, calib, evaluate, floor: float) -> dict:
    stage = work / "ours"
    shutil.rmtree(stage, ignore_errors=True)  # no calibration cache from an earlier run
    stage.mkdir(parents=True)
    cfg = StaticQdqInt8Config(op_types=["MatMul"], per_channel=False, calibration="minmax", search=True)
    t0 = time.perf_counter()
    path, final_cfg, trials = quantize_within_budget(fp32, cfg, stage, calib, evaluate, floor)
    wall = time.perf_counter() - t0
    rows = [{"description": t.description, "fidelity": t.fidelity, "passed": t.passed, "size_mb": t.size_mb}
            for t in trials]
    quantizations = sum(not t.description.startswith("reference") for t in trials)
    kept = [t.description for t in trials if t.description.startswith("keep in float")]
    return {"path": str(path), "config": final_cfg.model_dump(mode="json"), "trials": rows, "tuning_s": wall,
            "quantizations": quantizations, "evaluations": len(trials),
            "final_trial": next((i for i, t in enumerate(trials) if str(stage / f"trial{i}.onnx") == str(path)), None),
            "kept_in_float_steps": kept}


def run_inc(space: str, work: Path, budget: float, max_trials: int, inc_python: Path, timeout_s: int) -> dict:
    """Run inc_worker.py in the INC venv; return its JSON, or an error record that says why it could not run."""
    result_path = work / f"inc-{space}.json"
    result_path.unlink(missing_ok=True)
    (work / f"inc-{space}.onnx").unlink(missing_ok=True)
    if not inc_python.exists():
        return {"error": f"{inc_python} does not exist: create the INC venv (see this script's docstring)"}
    cmd = [str(inc_python), str(ROOT / "benchmarks" / "inc_worker.py"), "--work", str(work), "--space", space,
           "--budget", str(budget), "--max-trials", str(max_trials)]
    tail: deque[str] = deque(maxlen=40)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip())
        if line.startswith("[inc") or "Error" in line or "Traceback" in line:
            print("   ", line.rstrip(), flush=True)
        if time.perf_counter() - t0 > timeout_s:
            proc.kill()
            break
    rc = proc.wait()
    out = json.loads(result_path.read_text()) if result_path.exists() else {}
    out["worker_rc"], out["worker_s"] = rc, time.perf_counter() - t0
    if rc != 0 and "error" not in out:
        out["error"] = f"worker exited {rc}: " + " | ".join(list(tail)[-6:])
    out["worker_log_tail"] = list(tail)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "inc-compare")
    ap.add_argument("--budget", type=float, default=0.99, help="mean cosine to the fp32 ONNX model to reach")
    ap.add_argument("--calib-texts", type=int, default=64)
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--eval-texts", type=int, default=200)
    ap.add_argument("--max-trials", type=int, default=20, help="INC's max_trials")
    ap.add_argument("--spaces", default="matmul,default", help="INC tuning spaces to run (see inc_worker.py)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for fidelity evaluation")
    ap.add_argument("--latency-time", type=float, default=30.0, help="seconds of interleaved timing, all models")
    ap.add_argument("--inc-python", type=Path, default=ROOT / ".venv-inc" / "bin" / "python")
    ap.add_argument("--inc-timeout", type=int, default=3600)
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict = {"budget": args.budget, "onnxruntime": ort.__version__}

    # 1. model and data
    teacher = load_teacher("minilm", None)
    names = teacher.family.input_names(teacher.tokenizer)
    fp32 = work / "fp32.onnx"
    export_onnx(teacher.module, teacher.family, names, 17, fp32)  # unfused: no optimize_graph
    texts = load_transfer_set(None, "text", "label", None, args.calib_texts + args.eval_texts + 500).texts
    calib_texts = texts[:args.calib_texts]
    seen = set(calib_texts)
    eval_texts = [t for t in texts[args.calib_texts:] if t not in seen][:args.eval_texts]
    calib = [f for _, f in iter_batches(teacher.tokenizer, calib_texts, names, SEQ, args.calib_batch, fixed=True)]
    eval_feeds = [f for _, f in iter_batches(teacher.tokenizer, eval_texts, names, SEQ, 8, fixed=True)]
    ref_sess = session(fp32, args.threads)
    ref = np.concatenate([ref_sess.run(None, f)[0] for f in eval_feeds])
    save_feeds(work / "calib.npz", calib)
    save_feeds(work / "eval.npz", eval_feeds, ref)
    n_eval_rows = sum(f["input_ids"].shape[0] for f in eval_feeds)
    print(f"model: MiniLM teacher, unfused ONNX opset 17, {size_mb(fp32):.1f} MB; calibration {len(calib_texts)} texts "
          f"({len(calib)} batches of {args.calib_batch}); eval {len(eval_texts)} held-out texts ({n_eval_rows} rows "
          f"incl. padding copies), seq {SEQ}", flush=True)
    evaluate = partial(mean_cosine, feeds=eval_feeds, ref=ref, threads=args.threads)
    results["fp32_self_cosine"] = evaluate(fp32)

    # 2. plain static int8 (what the budget must be above), per-tensor and per-channel, no search
    plain = {}
    shutil.rmtree(work / "plain", ignore_errors=True)  # no calibration cache from an earlier run
    (work / "plain").mkdir()
    for pc in (False, True):
        out = work / "plain" / f"static-matmul-{'pc' if pc else 'pt'}.onnx"
        t0 = time.perf_counter()
        quantize(fp32, StaticQdqInt8Config(op_types=["MatMul"], per_channel=pc, calibration="minmax", search=False),
                 out, calib)
        plain[pc] = {"path": str(out), "cosine": evaluate(out), "quantize_s": time.perf_counter() - t0}
        print(f"plain static QDQ MatMul {'per-channel' if pc else 'per-tensor'} minmax: cosine {plain[pc]['cosine']:.5f}",
              flush=True)
    results["plain"] = {("per_channel" if k else "per_tensor"): v for k, v in plain.items()}
    if plain[False]["cosine"] >= args.budget:
        print(f"WARNING: plain per-tensor static int8 already meets the budget {args.budget}: no search is exercised",
              flush=True)

    # 3. ours
    print(f"\n== ours: quantize_within_budget, floor {args.budget}", flush=True)
    ours = run_ours(fp32, work, calib, evaluate, args.budget)
    for i, t in enumerate(ours["trials"]):
        print(f"   trial {i}: {t['fidelity']:.5f} {'PASS' if t['passed'] else '    '} {t['description']}", flush=True)
    print(f"   {ours['tuning_s']:.0f} s", flush=True)
    results["ours"] = ours

    # 4. INC
    inc = {}
    for space in [s for s in args.spaces.split(",") if s]:
        print(f"\n== INC autotune, space '{space}', tolerable_loss {1 - args.budget:.4g}, max_trials {args.max_trials}",
              flush=True)
        inc[space] = run_inc(space, work, args.budget, args.max_trials, args.inc_python, args.inc_timeout)
        if "error" in inc[space]:
            print(f"   FAILED: {inc[space]['error']}", flush=True)
    results["inc"] = inc

    # 5. final models: cosine re-measured here (onnxruntime of this venv), size, latency at 1 thread, batch 1, seq 128
    models = {"fp32 (unfused)": fp32, "plain static int8, per-tensor": Path(plain[False]["path"]),
              "ours (quantize_within_budget)": Path(ours["path"])}
    for space, r in inc.items():
        p = work / f"inc-{space}.onnx"
        if r.get("final") and p.exists():
            models[f"INC autotune ({space} space)"] = p
    lat_text = eval_texts[len(eval_texts) // 2]
    lat_feed = next(f for _, f in iter_batches(teacher.tokenizer, [lat_text], names, SEQ, 1, fixed=True))
    cos = {name: evaluate(p) for name, p in models.items()}
    sessions = {name: cpu_session(p, 1) for name, p in models.items()}
    lat = measure_interleaved({name: (partial(s.run, None), [lat_feed]) for name, s in sessions.items()},
                              warmup=10, min_blocks=10, min_time_s=args.latency_time, block_s=0.3)
    results["final"] = {name: {"path": str(p), "cosine": cos[name], "size_mb": size_mb(p),
                               "latency_p50_ms": lat[name].p50_ms, "latency_runs": lat[name].runs,
                               "qdq": count_qdq(p)} for name, p in models.items()}
    results["wall_s"] = time.perf_counter() - t_start
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))

    # 6. report
    def recipe_ours() -> str:
        c = ours["config"]
        groups = [short_group(re.sub(r"^.*keep in float: (\S+).*$", r"\1", s)) for s in ours["kept_in_float_steps"]]
        fl = results["final"]["ours (quantize_within_budget)"]["qdq"]
        return (f"calibration {c['calibration']}, {'per-channel' if c['per_channel'] else 'per-tensor'}; "
                f"{fl['matmul_quantized']}/{fl['matmul_total']} MatMuls int8; kept in float (groups, in order): "
                f"{', '.join(groups) if groups else 'none'}")

    def recipe_inc(space: str) -> str:
        r = inc[space]
        if not r.get("final_trial"):
            return "-"
        c = r["trials"][r["final_trial"] - 1]["config"]
        fl = results["final"][f"INC autotune ({space} space)"]["qdq"]
        ops = "MatMul" if c["op_types"] == ["MatMul"] else f"{len(c['op_types'])} op types"
        return (f"{ops}; calibration {c['calibrate_method']}, {'per-channel' if c['per_channel'] else 'per-tensor'}, "
                f"quant_last_matmul={c['quant_last_matmul']}; {fl['matmul_quantized']}/{fl['matmul_total']} MatMuls "
                f"int8 (float: {', '.join(short_group(n) for n in fl['float_matmuls']) or 'none'}); "
                f"{r['final']}")

    rows = []
    f = results["final"]
    for name in models:
        m = f[name]
        if name.startswith("fp32"):
            extra = ("-", "-", "-", "-", "reference")
        elif name.startswith("plain"):
            extra = ("1", "1", f"{plain[False]['quantize_s']:.0f}", "-", "StaticQdqInt8Config(MatMul, per-tensor, minmax), no search")
        elif name.startswith("ours"):
            extra = (str(ours["quantizations"]), str(ours["evaluations"]), f"{ours['tuning_s']:.0f}", "", recipe_ours())
        else:
            space = re.search(r"\((\w+) space\)", name).group(1)
            r = inc[space]
            extra = (str(len(r["trials"])), str(r.get("evaluations", "?")), f"{r.get('tuning_s', float('nan')):.0f}",
                     "", recipe_inc(space))
        met = "y" if m["cosine"] >= args.budget else "n"
        rows.append(f"| {name} | {met if not name.startswith('fp32') else '-'} | {m['cosine']:.5f} | {m['size_mb']:.1f} | "
                    f"{m['latency_p50_ms']:.2f} ({m['latency_runs']}) | {extra[0]} | {extra[1]} | {extra[2]} | {extra[4]} |")
    for space, r in inc.items():
        if not r.get("final"):
            rows.append(f"| INC autotune ({space} space) | n | - | - | - | {len(r.get('trials', []))} | "
                        f"{r.get('evaluations', '-')} | {r.get('tuning_s', float('nan')):.0f} | "
                        f"no model: {r.get('error') or r.get('autotune_exit', '?')} |")
    print(f"\n## Static int8 accuracy-aware tuning, MiniLM teacher (unfused ONNX), budget: mean cosine to fp32 >= "
          f"{args.budget} on {len(eval_texts)} held-out texts\n")
    print("| approach | met budget | cosine | size MB | latency ms p50 (runs) | quantizations | evaluations | "
          "tuning s | final recipe |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nlatency: onnxruntime {ort.__version__} CPU EP, ORT_ENABLE_ALL, 1 intra-op thread, batch 1 x {SEQ} tokens, "
          f"same input for all, interleaved blocks, median; cosine re-measured with onnxruntime {ort.__version__}.")
    print(f"plain per-channel static int8 (no search), for reference: cosine {plain[True]['cosine']:.5f}")

    print("\n### our search, trial by trial")
    for i, t in enumerate(ours["trials"]):
        print(f"{i:2d}. {t['fidelity']:.5f} {'PASS' if t['passed'] else ''} {t['description']}")
    for space, r in inc.items():
        print(f"\n### INC autotune, space '{space}' ({r.get('space_size', '?')} configs after expansion, "
              f"max_trials {args.max_trials}, tolerable_loss {r.get('tolerable_loss', float('nan')):.4g} relative to its "
              f"fp32 baseline {r.get('baseline', float('nan')):.6f})")
        if "versions" in r:
            print("versions:", ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
        for i, t in enumerate(r.get("trials", []), 1):
            c = t["config"]
            ops = "MatMul" if c["op_types"] == ["MatMul"] else f"{len(c['op_types'])} op types"
            print(f"{i:2d}. {t['cosine']:.5f} {'PASS' if t['passed'] else ''} {ops}, {c['calibrate_method']}, "
                  f"per_channel={c['per_channel']}, quant_last_matmul={c['quant_last_matmul']} "
                  f"(quantize {t['quantize_s']:.0f} s, eval {t['eval_s']:.0f} s)")
        if r.get("autotune_exit"):
            print("note:", r["autotune_exit"])
        if r.get("error"):
            print("ERROR:", r["error"])
            print("\n".join(r.get("worker_log_tail", [])[-15:]))
    d = next((r["inc_default_static_config"] for r in inc.values() if "inc_default_static_config" in r), None)
    if d:
        print("\n### what INC's default static config does")
        print("StaticQuantConfig() (no arguments):", json.dumps(d["StaticQuantConfig()"]))
        print("StaticQuantConfig(quant_format=QDQ) quantizes op types:", ", ".join(d["StaticQuantConfig(quant_format=QDQ) op types"]))
        print("StaticQuantConfig.get_config_set_for_tuning(QDQ), expanded, in trial order:")
        for i, c in enumerate(d["get_config_set_for_tuning(QDQ)"], 1):
            print(f"  {i:2d}. {len(c['op_types'])} op types (MatMul in: {'MatMul' in c['op_types']}), "
                  f"per_channel={c['per_channel']}, quant_last_matmul={c['quant_last_matmul']}, {c['calibrate_method']}")
    print(f"\nresults: {work / 'results.json'}; total {results['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
