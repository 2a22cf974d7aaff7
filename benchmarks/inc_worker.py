"""Intel Neural Compressor (onnx-neural-compressor) accuracy-aware tuning of static QDQ int8, for inc_compare.py.

Runs in its own venv (.venv-inc: onnx-neural-compressor pins numpy<2) and imports only numpy, onnx, onnxruntime,
onnx_neural_compressor and the stdlib. inc_compare.py writes the work dir (fp32.onnx, calib.npz, eval.npz with the fp32
reference outputs) and reads back inc-<space>.json and inc-<space>.onnx.

    .venv-inc/bin/python benchmarks/inc_worker.py --work build/inc-compare --space matmul --budget 0.99 --max-trials 20

Spaces (what the tuner may try, in INC's own expansion order):
    matmul:  StaticQuantConfig(QDQ, op_types=["MatMul"]) with per_channel [False, True] x calibrate_method
             [MinMax, Entropy, Percentile] x quant_last_matmul [True, False]: the same operators as our recipe, and
             every knob INC's static config exposes for them.
    default: StaticQuantConfig.get_config_set_for_tuning(quant_format=QDQ): INC's own static tuning set (every op
             type its CPU QDQ list knows, then without Add/Mul, without Gather*, without Attention; x per_channel x
             quant_last_matmul).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def load_feeds(path: Path) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """Return the batches stored as '<i>/<input name>' keys (and the 'ref' array when present)."""
    z = np.load(path)
    batches: dict[int, dict[str, np.ndarray]] = {}
    for key in z.files:
        if "/" in key:
            i, name = key.split("/", 1)
            batches.setdefault(int(i), {})[name] = z[key]
    return [batches[i] for i in sorted(batches)], (z["ref"] if "ref" in z.files else None)


def session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def mean_cosine(path: str, feeds: list[dict[str, np.ndarray]], ref: np.ndarray, threads: int) -> float:
    """The fidelity metric, identical to inc_compare.py's: mean cosine of the output rows to the fp32 reference."""
    sess = session(path, threads)
    out = np.concatenate([sess.run(None, f)[0] for f in feeds]).astype(np.float64)
    r = ref.astype(np.float64)
    cos = np.sum(out * r, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(r, axis=1))
    return float(cos.mean())


def describe(cfg) -> dict:
    """The knobs of one StaticQuantConfig trial that matter for MatMul, in plain JSON."""
    mm = cfg.local_config.get("MatMul")
    enum = lambda v: getattr(v, "name", str(v))  # noqa: E731
    return {
        "op_types": sorted(cfg.op_types_to_quantize),
        "quant_format": enum(cfg.quant_format),
        "per_channel": getattr(mm, "per_channel", cfg.per_channel),
        "calibrate_method": enum(getattr(mm, "calibrate_method", cfg.calibrate_method)),
        "weight_type": enum(getattr(mm, "weight_type", cfg.weight_type)),
        "activation_type": enum(getattr(mm, "activation_type", cfg.activation_type)),
        "weight_sym": getattr(mm, "weight_sym", cfg.weight_sym),
        "activation_sym": getattr(mm, "activation_sym", cfg.activation_sym),
        "reduce_range": cfg.reduce_range,
        "quant_last_matmul": cfg.quant_last_matmul,
        "nodes_to_exclude": list(cfg.nodes_to_exclude or []),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--space", choices=("matmul", "default"), default="matmul")
    ap.add_argument("--budget", type=float, required=True, help="mean cosine to fp32 the result must reach")
    ap.add_argument("--max-trials", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for the fidelity evaluation")
    args = ap.parse_args()
    work = args.work
    result_path, model_out = work / f"inc-{args.space}.json", work / f"inc-{args.space}.onnx"
    result: dict = {"space": args.space, "budget": args.budget, "max_trials": args.max_trials, "trials": []}

    def save() -> None:
        result_path.write_text(json.dumps(result, indent=1, default=str))

    try:
        import onnx_neural_compressor
        from onnx_neural_compressor import data_reader
        from onnx_neural_compressor.quantization import CalibrationMethod, QuantFormat, QuantType, tuning
        from onnx_neural_compressor.quantization import config as inc_config
        from onnx_neural_compressor.quantization.tuning import TuningConfig, autotune
    except Exception as e:  # report why the package cannot be used here, and stop
        result.update(error=f"import failed: {type(e).__name__}: {e}", traceback=traceback.format_exc())
        save()
        print(result["error"], file=sys.stderr)
        return 2
    from importlib.metadata import version
    result["versions"] = {p: version(p) for p in ("onnx-neural-compressor", "onnxruntime", "onnx", "numpy")}
    logging.getLogger("onnx_neural_compressor").setLevel(logging.WARNING)

    calib, _ = load_feeds(work / "calib.npz")
    eval_feeds, ref = load_feeds(work / "eval.npz")

    class Reader(data_reader.CalibrationDataReader):
        def __init__(self, feeds):
            self.feeds, self.i = feeds, 0

        def get_next(self):
            if self.i >= len(self.feeds):
                return None
            self.i += 1
            return self.feeds[self.i - 1]

        def rewind(self):
            self.i = 0

    # what INC's defaults do (printed for the report)
    default_cfg = inc_config.StaticQuantConfig(execution_provider="CPUExecutionProvider")
    result["inc_default_static_config"] = {
        "StaticQuantConfig()": describe(default_cfg),
        "StaticQuantConfig(quant_format=QDQ) op types": sorted(
            inc_config.StaticQuantConfig(quant_format=QuantFormat.QDQ,
                                         execution_provider="CPUExecutionProvider").op_types_to_quantize),
        "get_config_set_for_tuning(QDQ)": [
            {k: v for k, v in describe(c).items() if k in ("op_types", "per_channel", "quant_last_matmul",
                                                            "calibrate_method")}
            for cfg in inc_config.StaticQuantConfig.get_config_set_for_tuning(
                quant_format=QuantFormat.QDQ, execution_provider="CPUExecutionProvider")
            for c in cfg.expand()],
    }

    if args.space == "matmul":
        # One expandable config per calibration method: a list-valued calibrate_method expands into operator configs
        # holding the CalibrationMethod enum where the calibrator registry is keyed by its name, and the first trial
        # fails with "AssertionError: Calibration method CalibrationMethod.MinMax is not registered." (found here
        # with onnx-neural-compressor 1.0). A list of configs is the documented alternative and expands the same.
        config_set = [inc_config.StaticQuantConfig(
            quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=False,
            per_channel=[False, True], calibrate_method=method,
            quant_last_matmul=[True, False], calibration_sampling_size=len(calib),
            execution_provider="CPUExecutionProvider")
            for method in (CalibrationMethod.MinMax, CalibrationMethod.Entropy, CalibrationMethod.Percentile)]
        result["workaround"] = ("calibrate_method=[MinMax, Entropy, Percentile] in one StaticQuantConfig fails at the "
                                "first trial (AssertionError: Calibration method CalibrationMethod.MinMax is not "
                                "registered.); passed as a list of 3 configs, one per method, instead")
    else:
        config_set = inc_config.StaticQuantConfig.get_config_set_for_tuning(
            quant_format=QuantFormat.QDQ, calibration_sampling_size=len(calib),
            execution_provider="CPUExecutionProvider")
    expanded = tuning.ConfigSet.from_fwk_configs(config_set)
    result["space_size"] = len(expanded)
    result["space"] = [describe(c) for c in expanded.config_list]
    # INC's criterion is relative to its own fp32 baseline: pass iff score >= baseline * (1 - tolerable_loss);
    # the baseline is this same metric on the fp32 graph (1.0 up to rounding), so this is cosine >= budget
    tolerable_loss = 1.0 - args.budget
    result["tolerable_loss"] = tolerable_loss

    # record each trial: wrap INC's per-trial quantize entry (config + time) and the eval function (score)
    original_quantize = tuning._quantize
    pending: dict = {}

    def recording_quantize(model_input, quant_config, calibration_data_reader=None):
        t0 = time.perf_counter()
        try:
            return original_quantize(model_input, quant_config, calibration_data_reader)
        finally:
            pending.update(config=describe(quant_config), quantize_s=time.perf_counter() - t0)

    tuning._quantize = recording_quantize
    best = {"score": -1.0}
    evals = {"n": 0}

    def eval_fn(model_path: str) -> float:
        t0 = time.perf_counter()
        score = mean_cosine(model_path, eval_feeds, ref, args.threads)
        evals["n"] += 1
        if not pending:  # autotune evaluates the fp32 graph first, as its baseline
            result["baseline"] = score
            print(f"[inc {args.space}] fp32 baseline {score:.6f}", flush=True)
            return score
        trial = {**pending, "cosine": score, "eval_s": time.perf_counter() - t0,
                 "passed": score >= result["baseline"] * (1 - tolerable_loss)}
        pending.clear()
        result["trials"].append(trial)
        print(f"[inc {args.space}] trial {len(result['trials'])}: cosine {score:.6f} "
              f"per_channel={trial['config']['per_channel']} calib={trial['config']['calibrate_method']} "
              f"last_matmul={trial['config']['quant_last_matmul']} ops={len(trial['config']['op_types'])}", flush=True)
        if score > best["score"]:  # autotune exits the process when nothing passes: keep the best model ourselves
            best["score"] = score
            onnx.save(onnx.load(model_path), str(model_out))
            best["trial"] = len(result["trials"])
        save()
        return score

    t0 = time.perf_counter()
    exit_code = None
    try:
        q_model = autotune(str(work / "fp32.onnx"),
                           TuningConfig(config_set=config_set, tolerable_loss=tolerable_loss,
                                        max_trials=args.max_trials),
                           eval_fn=eval_fn, calibration_data_reader=Reader(calib))
    except SystemExit as e:  # onnx_neural_compressor's autotune calls exit(0) when no trial meets the goal
        q_model, exit_code = None, e.code
    except Exception as e:
        result.update(error=f"autotune failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                      traceback=traceback.format_exc())
        q_model = None
    result["tuning_s"] = time.perf_counter() - t0
    result["evaluations"] = evals["n"]
    result["autotune_returned_model"] = q_model is not None
    if exit_code is not None:
        result["autotune_exit"] = (f"autotune called exit({exit_code}) without returning a model "
                                   "(no trial met the tolerable loss)")
    if result["trials"]:
        top = max(range(len(result["trials"])), key=lambda i: result["trials"][i]["cosine"])
        result["best_trial"], result["best_cosine"] = top + 1, result["trials"][top]["cosine"]
    if q_model is not None:
        onnx.save(q_model, str(model_out))
        # autotune stops at the first trial that meets the goal or at max_trials, and returns that trial's model:
        # on max_trials it is the last one tried, not the most faithful
        met = bool(result["trials"]) and result["trials"][-1]["passed"]
        result["final"] = ("the model autotune returned: the first trial to meet the goal" if met else
                           "the model autotune returned: the LAST trial (max_trials reached, goal not met)")
        result["final_trial"] = len(result["trials"])
    elif "trial" in best:
        result["final"] = "the most faithful trial (kept by this worker; autotune returned none)"
        result["final_trial"] = best["trial"]
    else:
        model_out.unlink(missing_ok=True)
        result["final"] = None
    save()
    print(f"[inc {args.space}] done in {result['tuning_s']:.0f} s, {len(result['trials'])} trials, "
          f"returned model: {q_model is not None}", flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
