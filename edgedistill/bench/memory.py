"""Peak memory of one inference process: run as a child (`python -m edgedistill.bench.memory ...`) so that the
measurement covers exactly imports + session creation + runs of one model, and nothing else bench did."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _status_mb(field: str) -> float:
    """Return a /proc/self/status memory field in MB. VmHWM, not getrusage's ru_maxrss: ru_maxrss is inherited
    through fork+exec, so a child of a big parent would report the parent's peak (seen here: 836 MB for a 91 MB run)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_peak_rss(kind: str, target: str, threads: int, batch: int, seq: int, vocab_size: int,
                     runtime: str = "ort-cpu", runs: int = 20, vision_model: dict | None = None) -> dict[str, float]:
    """Return {'peak_rss_mb', 'rss_after_imports_mb'} of a fresh process that loads `target` and runs it `runs` times.
    With `vision_model` (UserVisionModel's fields) the model is an image classifier fed (batch, 3, seq, seq) pixels:
    `seq` is the image side, and a teacher spec is loaded as the manifest recorded it."""
    cmd = [sys.executable, "-m", "edgedistill.bench.memory", kind, target, "--threads", str(threads), "--batch",
           str(batch), "--seq", str(seq), "--vocab-size", str(vocab_size), "--runtime", runtime, "--runs", str(runs)]
    if vision_model is not None:
        cmd += ["--vision-model", json.dumps(vision_model)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["onnx", "teacher"])
    ap.add_argument("target", help="model file (onnx/ort) or teacher spec")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, required=True, help="token ids are drawn below this")
    ap.add_argument("--runtime", default="ort-cpu")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--vision-model", help="an image classifier: UserVisionModel's fields as JSON")
    args = ap.parse_args()
    import numpy as np

    if args.vision_model is not None:
        _image_probe(args)
        return
    if args.kind == "onnx":
        import onnxruntime  # noqa: F401  (imports count as the baseline, not as the model's cost)

        from edgedistill.runtimes.registry import RUNTIMES

        base = _status_mb("VmRSS")
        run, _ = RUNTIMES[args.runtime].load(Path(args.target), args.threads)
    else:
        import torch
        import transformers  # noqa: F401

        from edgedistill.teachers import load_teacher

        torch.set_num_threads(args.threads)
        base = _status_mb("VmRSS")
        teacher = load_teacher(args.target)
        names = teacher.family.input_names(teacher.tokenizer)

        def run(feeds):
            with torch.inference_mode():
                return teacher.module(**{k: torch.from_numpy(v) for k, v in feeds.items() if k in names})
    rng = np.random.default_rng(0)
    ids = rng.integers(5, args.vocab_size, (args.batch, args.seq)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    for _ in range(args.runs):
        run(feeds)
    peak = _status_mb("VmHWM")
    print(json.dumps({"peak_rss_mb": round(peak, 1), "rss_after_imports_mb": round(base, 1)}))


def _image_probe(args) -> None:
    """The image-classifier probe: an onnxruntime session of the model file, or the teacher in torch, fed uint8-range
    pixels in [0, 1] at (batch, 3, side, side)."""
    import numpy as np

    x = np.random.default_rng(0).random((args.batch, 3, args.seq, args.seq), dtype=np.float32)
    if args.kind == "onnx":
        import onnxruntime  # noqa: F401

        from edgedistill.runtimes.ort_cpu import cpu_session

        base = _status_mb("VmRSS")
        session = cpu_session(Path(args.target), args.threads)
        run = lambda: session.run(None, {"pixels": x})  # noqa: E731
    else:
        import torch

        from edgedistill.teachers import load_teacher
        from edgedistill.teachers.vision import UserVisionModel

        torch.set_num_threads(args.threads)
        base = _status_mb("VmRSS")
        module = load_teacher(args.target, "image-classification",
                              vision_model=UserVisionModel(**json.loads(args.vision_model))).module
        tx = torch.from_numpy(x)

        def run():
            with torch.inference_mode():
                return module(tx)
    for _ in range(args.runs):
        run()
    print(json.dumps({"peak_rss_mb": round(_status_mb("VmHWM"), 1), "rss_after_imports_mb": round(base, 1)}))


if __name__ == "__main__":
    main()
