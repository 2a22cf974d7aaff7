"""Scale and survive: resume after SIGKILL, 2-process DDP (gloo) on CPU, sharded labelling, the OUT lock, disk
errors, byte-identical artifacts."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_texts, tiny_workspace, write_profile
from typer.testing import CliRunner

from edgedistill.cli import app
from edgedistill.distill.loop import DistillConfig
from edgedistill.pipeline import RUN_DIR, CompileOptions, compile
from edgedistill.runs import run_lock

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgedistill.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "EDGEDISTILL_QUIET": "1", **(env or {})}, **kw)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resilience")
    teacher, data = tiny_workspace(root, texts=1600)
    return root, teacher, data, write_profile(root / "tiny-cpu.yaml")


def _model_bytes(out: Path) -> bytes:
    return (out / "tiny-cpu" / "model.onnx").read_bytes()


def test_kill_and_resume_equals_uninterrupted_run(workspace, tmp_path):
    root, teacher, data, profile = workspace
    args = ["compile", str(teacher), "--data", str(data), "--target", str(profile), "--epochs", "3", "--batch-size", "8",
            "--checkpoint-every", "20"]
    # uninterrupted reference
    ref = _cli(*args, "--out", str(tmp_path / "ref"), "--cache-dir", str(tmp_path / "cache-ref"))
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    # the same run, killed with SIGKILL once it has checkpointed mid-training
    out = tmp_path / "out"
    state = out / RUN_DIR / "checkpoint" / "state.json"
    proc = _cli(*args, "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
    deadline = time.time() + 600
    while not state.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    step = json.loads(state.read_text())["position"]["step"]
    total = 3 * 190  # 1520 training texts / batch 8, 3 epochs
    assert 0 < step < total and not (out / "tiny-cpu").exists()
    res = _cli("compile", "--resume", str(out))
    assert res.wait(timeout=600) == 0, res.stdout.read()
    a = json.loads((out / "tiny-cpu" / "manifest.json").read_text())
    b = json.loads((tmp_path / "ref" / "tiny-cpu" / "manifest.json").read_text())
    assert a["distillation"]["history"] == b["distillation"]["history"]
    assert _model_bytes(out) == _model_bytes(tmp_path / "ref"), "resumed and uninterrupted runs give the same bytes"
    assert not (out / RUN_DIR).exists()


def test_resume_needs_an_interrupted_run(tmp_path):
    res = runner.invoke(app, ["compile", "--resume", str(tmp_path)])
    assert res.exit_code == 2 and "holds no interrupted compile" in res.stderr


def test_same_inputs_and_seed_give_byte_identical_artifacts(workspace, tmp_path):
    root, teacher, _, profile = workspace
    data = tmp_path / "d.txt"
    data.write_text("\n".join(make_texts(240)))
    for name in ("a", "b"):  # separate caches: both runs label and train from scratch
        compile(str(teacher), str(data), [str(profile)], tmp_path / name,
                CompileOptions(distill=DistillConfig(epochs=1), cache_dir=tmp_path / f"cache-{name}"))
    assert _model_bytes(tmp_path / "a") == _model_bytes(tmp_path / "b")
    for f in ("tokenizer.json", "validation-teacher.npy", "validation-texts.jsonl"):
        assert (tmp_path / "a" / "tiny-cpu" / f).read_bytes() == (tmp_path / "b" / "tiny-cpu" / f).read_bytes()


def test_two_processes_with_gloo_match_one(workspace, tmp_path):
    root, teacher, data, profile = workspace
    args = ["compile", str(teacher), "--data", str(data), "--target", str(profile), "--epochs", "1", "--batch-size", "8"]
    env = {**os.environ, "EDGEDISTILL_QUIET": "1", "EDGEDISTILL_SHARD_TEXTS": "256", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "edgedistill.cli", *args, "--out", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "cache2")]
    two = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "edgedistill.cli", *args, "--out", str(tmp_path / "one"), "--cache-dir",
                          str(tmp_path / "cache1")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    # labelling was split: 1600 texts in shards of 256 -> 7 shards, written by both processes (+1: the 256
    # out-of-domain paragraphs)
    assert len(list((tmp_path / "cache2" / "labels").glob("*/shard-*.keys.npy"))) == 7 + 1
    m1 = json.loads((tmp_path / "one" / "tiny-cpu" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "two" / "tiny-cpu" / "manifest.json").read_text())
    f1, f2 = m1["distillation"]["best_fidelity"], m2["distillation"]["best_fidelity"]
    assert abs(f1 - f2) < 0.01, (f1, f2)
    c1, c2 = m1["metrics"]["values"]["cosine_mean"], m2["metrics"]["values"]["cosine_mean"]
    assert abs(c1 - c2) < 0.01, (c1, c2)
    assert m2["distillation"]["history"][-1][0] == m1["distillation"]["history"][-1][0]  # same number of steps


def test_a_second_compile_into_the_same_out_is_refused(workspace, tmp_path):
    root, teacher, data, profile = workspace
    out = tmp_path / "out"
    out.mkdir()
    with run_lock(out):
        res = runner.invoke(app, ["compile", str(teacher), "--data", str(data), "--target", str(profile), "--out", str(out)])
    assert res.exit_code == 2 and "another edgedistill compile is writing to" in res.stderr and "pid" in res.stderr
    assert not (out / "tiny-cpu").exists()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_disk_full_or_read_only_output_is_a_clear_error_and_nothing_is_published(workspace, tmp_path, monkeypatch, err):
    import shutil

    from edgedistill import artifact

    root, teacher, _, profile = workspace
    data = tmp_path / "d.txt"
    data.write_text("\n".join(make_texts(120)))
    real = shutil.copyfile
    calls = []

    def failing_copy(src, dst, *a, **k):  # the device fills up (or is remounted read-only) mid-artifact
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(err, os.strerror(err), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(artifact.shutil, "copyfile", failing_copy)
    out = tmp_path / "out"
    res = runner.invoke(app, ["compile", str(teacher), "--data", str(data), "--target", str(profile), "--out", str(out),
                              "--epochs", "1"])
    assert res.exit_code == 2 and os.strerror(err) in res.stderr and "Traceback" not in res.output
    # no artifact and no temporary files; the run record stays, so that --resume re-uses the finished training
    assert sorted(p.name for p in out.iterdir()) == [".edgedistill-run", ".edgedistill.lock"]
    monkeypatch.undo()
    res = runner.invoke(app, ["compile", "--resume", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "tiny-cpu" / "model.onnx").is_file() and not (out / ".edgedistill-run").exists()


def test_labels_are_streamed_from_a_memory_map(workspace, tmp_path):
    from edgedistill.data import load_transfer_set
    from edgedistill.families.text_encoder_labels import label_with_teacher
    from edgedistill.teachers import load_teacher

    root, teacher_dir, data, _ = workspace
    teacher = load_teacher(str(teacher_dir), None)
    ts = load_transfer_set(str(data), "text", "label", None, None)
    outputs = label_with_teacher(teacher, ts, 32, tmp_path / "c")
    assert isinstance(outputs, np.memmap) and outputs.shape == (len(ts), 32) and not outputs.flags.writeable
