"""A labelled vision case, measured in one run: a CNN trained here on Fashion-MNIST's 60,000 training images is the
teacher; `edgedistill compile` (as a user runs it: the state dict, --arch, --data .npz with labels) prunes it to a
share of its MACs, distils it with the labels, quantizes it to static int8 and validates it; then every model is
scored on the 10,000 test images no step has seen: the teacher in torch fp32, the peer path (the teacher exported
and statically quantized by onnxruntime the plain way), and our artifact.

    python benchmarks/vision_fashion.py [--macs-ratio 0.25] [--epochs 3] [--threads 2] [--out build/fashion]

Fashion-MNIST comes from Debian's dataset-fashion-mnist (`make bench-vision-fashion` installs it). Prints test
accuracy, top-1 agreement with the teacher, batch-1 latency and batch-64 images/s (ratios to the teacher), MACs and
size. The teacher is cached in OUT by its seed and epochs.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's training-set pixel mean and std on [0, 1]


def build(width: int = 32, num_classes: int = 10) -> nn.Module:
    """The teacher: a VGG-style CNN for 28x28 RGB (grey images repeated on 3 channels), ~22M MACs at width 32."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    w = width
    return nn.Sequential(*block(3, w), *block(w, w), nn.MaxPool2d(2), *block(w, 2 * w), *block(2 * w, 2 * w),
                         nn.MaxPool2d(2), *block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * w, num_classes))


def read_idx(path: Path) -> np.ndarray:
    """Return an IDX file (the MNIST format: big-endian dims after a magic number) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def load_fashion() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
    missing = [n for n in names if not (FASHION_DIR / n).is_file()]
    if missing:
        sys.exit(f"error: Fashion-MNIST is not installed ({FASHION_DIR}/{missing[0]} missing) "
                 "(hint: make bench-vision-fashion, or apt-get install dataset-fashion-mnist)")
    return tuple(read_idx(FASHION_DIR / n) for n in names)


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) grey -> float (N, 3, 28, 28) in [0, 1], as the artifact takes them."""
    return torch.from_numpy(images).float().div(255.0)[:, None].expand(-1, 3, -1, -1).contiguous()


def train_teacher(x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> nn.Module:
    """Train the teacher on normalized pixels, random flips and shifts of up to 2 px; AdamW, one-cycle."""
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    batch = 128
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    xs, ys = pixels(x), torch.from_numpy(y.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(xs), generator=gen)
        for i in range(len(xs) // batch):
            idx = order[i * batch : (i + 1) * batch]
            xb = xs[idx]
            flip = torch.rand(len(xb), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            xb = torch.roll(torch.nn.functional.pad(xb, (2, 2, 2, 2)), (dy, dx), (2, 3))[..., 2:-2, 2:-2]
            loss = nn.functional.cross_entropy(model((xb - MEAN) / STD), ys[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"teacher epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    return model.eval()


class Normalized(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net((x - MEAN) / STD)


def logits_torch(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([model(b) for b in x.split(500)]).numpy()


def logits_onnx(session, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    if isinstance(fixed, int):
        batch = fixed
    out = []
    for b in x.numpy().reshape(-1, batch, *x.shape[1:]) if len(x) % batch == 0 else [x.numpy()]:
        out.append(session.run(None, {name: b})[0])
    return np.concatenate(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--macs-ratio", type=float, default=0.25)
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3, help="distillation epochs of the compile")
    ap.add_argument("--target", default="x86-64-avx512")
    ap.add_argument("--crop-scale", type=float, default=0.7, help="the compile's --crop-scale")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("build/fashion"))
    ap.add_argument("--min-time", type=float, default=4.0, help="seconds of interleaved timing per batch size")
    ap.add_argument("--json", type=Path)
    ap.add_argument("compile_args", nargs="*", help="extra compile flags after --, e.g. -- --lr 1e-3")
    args = ap.parse_args()
    from edgedistill.bench.timer import measure_interleaved, paired_ratio
    from edgedistill.families.vision import count_macs
    from edgedistill.families.vision_export import export_vision
    from edgedistill.quantize import quantize
    from edgedistill.quantize.configs import StaticQdqInt8Config
    from edgedistill.runtimes.ort_cpu import cpu_session

    torch.set_num_threads(args.threads)
    x_train, y_train, x_test, y_test = load_fashion()
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / f"teacher-s{args.seed}-e{args.teacher_epochs}.safetensors"
    from safetensors.torch import load_file, save_file

    net = build()
    if weights.is_file():
        net.load_state_dict(load_file(str(weights)))
        net.eval()
    else:
        net = train_teacher(x_train, y_train, args.teacher_epochs, args.seed)
        save_file(net.state_dict(), str(weights))
    teacher = Normalized(net).eval()
    data = args.out / "fashion-train.npz"
    if not data.is_file():
        np.savez(data, images=x_train, labels=y_train.astype(np.int64), class_names=np.array(CLASSES))

    artifact = args.out / "student" / args.target
    cmd = [sys.executable, "-m", "edgedistill.cli", "compile", str(weights), "--arch", "vision_fashion:build",
           "--normalize", f"{MEAN},{MEAN},{MEAN}/{STD},{STD},{STD}", "--image-size", "28", "--data", str(data),
           "--target", args.target, "--macs-ratio", str(args.macs_ratio), "--epochs", str(args.epochs),
           "--seed", str(args.seed), "--out", str(args.out / "student"), "--keep-rejected",
           # the garments fill the 28x28 frame and the teacher saw whole frames: mild crops, no held-out crop
           "--crop-scale", str(args.crop_scale), "--resize", "28", *args.compile_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if not artifact.is_dir():
        artifact = artifact.with_name(artifact.name + ".rejected")
    if not artifact.is_dir():
        sys.exit(f"error: the compile exited {rc} without an artifact")
    manifest = json.loads((artifact / "manifest.json").read_text())

    xt = pixels(x_test)
    work = args.out / "peer"
    work.mkdir(exist_ok=True)
    fp32, _ = export_vision(teacher, 28, work / "teacher.onnx", 17)
    rng = np.random.default_rng(12345)  # the peer calibrates on 64 training images, as a user would
    calib = [{"pixels": pixels(x_train[i : i + 1]).numpy()} for i in rng.choice(len(x_train), 64, replace=False)]
    peer = quantize(fp32, StaticQdqInt8Config(op_types=["Conv", "Gemm"], calibration_texts=64, search=False),
                    work / "peer-int8.onnx", calib)
    sessions = {"teacher, onnxruntime fp32": cpu_session(fp32, args.threads),
                "peer: teacher + plain onnxruntime int8": cpu_session(peer, args.threads),
                f"ours: {artifact.name}": cpu_session(artifact / "model.onnx", args.threads)}
    ref = logits_torch(teacher, xt)
    outputs = {"teacher, torch fp32": ref, **{n: logits_onnx(s, xt) for n, s in sessions.items()}}
    teacher_macs = count_macs(net, 28)
    macs = {"teacher, torch fp32": teacher_macs, **{n: teacher_macs for n in sessions}}
    macs[list(sessions)[-1]] = manifest["student"]["pruning"]["student_macs"]
    sizes = {"teacher, torch fp32": weights.stat().st_size / 1e6, "teacher, onnxruntime fp32": fp32.stat().st_size / 1e6,
             "peer: teacher + plain onnxruntime int8": peer.stat().st_size / 1e6,
             list(sessions)[-1]: (artifact / "model.onnx").stat().st_size / 1e6}
    timing = {}
    for batch in (1, 64):
        xb = xt[:batch].contiguous()
        cands = {"teacher, torch fp32": (lambda _: teacher(xb), [0])}
        for name, s in sessions.items():
            fixed = s.get_inputs()[0].shape[0]
            if isinstance(fixed, int) and fixed != batch:
                continue
            cands[name] = (lambda _, s=s: s.run(None, {"pixels": xb.numpy()}), [0])
        with torch.inference_mode():
            timing[batch] = measure_interleaved(cands, warmup=5, min_blocks=5, min_time_s=args.min_time, block_s=0.3,
                                                settle=1)
    table = Table(title=f"Fashion-MNIST: {len(xt):,} test images no step saw; {args.threads} threads, interleaved; "
                        "ratios = medians of paired block ratios")
    for col in ("model", "test acc", "Δ vs teacher (pts)", "top-1 agr", "MACs (M)", "% MACs", "b1 ms", "b1 × teacher",
                "b64 img/s", "b64 × teacher", "MB"):
        table.add_column(col)
    rows = []
    teacher_acc = float((ref.argmax(-1) == y_test).mean())
    for name, out in outputs.items():
        acc = float((out.argmax(-1) == y_test).mean())
        agree = float((out.argmax(-1) == ref.argmax(-1)).mean())
        t1, t64 = timing[1].get(name), timing[64].get(name)
        s1 = 1 / paired_ratio(t1.block_p50_ms, timing[1]["teacher, torch fp32"].block_p50_ms) if t1 else None
        s64 = 1 / paired_ratio(t64.block_p50_ms, timing[64]["teacher, torch fp32"].block_p50_ms) if t64 else None
        rows.append({"model": name, "test_accuracy": acc, "delta_points": 100 * (acc - teacher_acc),
                     "top1_agreement": agree, "macs": macs[name], "b1_ms": t1.p50_ms if t1 else None,
                     "b1_speedup_vs_teacher": s1, "b64_images_per_s": 64000 / t64.p50_ms if t64 else None,
                     "b64_speedup_vs_teacher": s64, "size_mb": sizes[name]})
        table.add_row(name, f"{acc:.4f}", f"{100 * (acc - teacher_acc):+.2f}", f"{agree:.4f}", f"{macs[name] / 1e6:.1f}",
                      f"{macs[name] / teacher_macs:.0%}", f"{t1.p50_ms:.3f}" if t1 else "-", f"{s1:.2f}" if s1 else "-",
                      f"{64000 / t64.p50_ms:.0f}" if t64 else "-", f"{s64:.2f}" if s64 else "-", f"{sizes[name]:.3f}")
    Console(width=200).print(table)
    ours = rows[-1]
    print(f"reach: student {ours['macs'] / teacher_macs:.0%} of the teacher's MACs (≤ 25%), int8 test accuracy "
          f"{ours['test_accuracy']:.4f} vs the teacher's {teacher_acc:.4f}: {ours['delta_points']:+.2f} points "
          f"({'met' if ours['delta_points'] >= -1.5 and ours['macs'] <= 0.25 * teacher_macs else 'not met'}: within 1.5)")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows, "compile": cmd[2:]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
