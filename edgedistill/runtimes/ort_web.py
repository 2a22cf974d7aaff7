"""onnxruntime-web in a real headless Chromium: the browser runtime's adapter.

A node process (edgedistill/browser/driver.mjs) serves files on localhost with cross-origin isolation (WASM threads
need SharedArrayBuffer), drives the system Chromium through playwright-core, and answers one JSON request per line.
Models run in a page with onnxruntime-web; latency is timed inside the page with performance.now() (a Python <->
page round trip costs milliseconds, more than the model), read back, and summarized by the harness's timer.
Nothing is downloaded at run time: node packages come from the project's `npm ci` (`make install`), the browser is
Debian's `chromium`.
"""
from __future__ import annotations

import atexit
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgedistill.errors import EdgeDistillError

ASSETS = Path(__file__).resolve().parents[1] / "browser"
CHROMIUM_ENV = "EDGEDISTILL_CHROMIUM"  # the browser executable (default /usr/bin/chromium)
NODE_MODULES_ENV = "EDGEDISTILL_NODE_MODULES"  # the node_modules folder of `npm ci` (default: the checkout's)
DEFAULT_CHROMIUM = "/usr/bin/chromium"
NPM_PACKAGES = ("onnxruntime-web", "playwright-core")
INSTALL_HINT = "run `make install` (apt: chromium, nodejs; npm ci: onnxruntime-web, playwright-core)"
# the onnxruntime-web files a page of each execution provider loads (the module, its WASM glue and binary),
# copied into the artifact so that the folder runs from any static server
ORT_FILES = {"wasm": ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"),
             "webgpu": ("ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")}
PAGE_FILES = ("index.html", "demo.js", "runner.js", "wordpiece.js", "serve.py")


class BrowserMissing(EdgeDistillError):
    """Chromium, node or the npm packages the browser runtime needs are missing or do not start."""


@dataclass(frozen=True)
class Setup:
    """Where the browser runtime's pieces are on this machine."""

    node: str
    node_modules: Path
    chromium: str

    @property
    def ort_dist(self) -> Path:
        return self.node_modules / "onnxruntime-web" / "dist"

    def ort_web_version(self) -> str:
        return json.loads((self.node_modules / "onnxruntime-web" / "package.json").read_text())["version"]


def find_setup() -> Setup:
    """Return the node, node_modules and Chromium to use, or raise BrowserMissing naming the missing piece."""
    node = shutil.which("node")
    if node is None:
        raise BrowserMissing("the browser runtime needs node (Debian package nodejs), which is not on PATH", hint=INSTALL_HINT)
    modules = Path(os.environ.get(NODE_MODULES_ENV) or Path(__file__).resolve().parents[2] / "node_modules")
    for package in NPM_PACKAGES:
        if not (modules / package / "package.json").is_file():
            raise BrowserMissing(f"the browser runtime needs the npm package {package}, not found in {modules}",
                                 hint=f"{INSTALL_HINT}, or set {NODE_MODULES_ENV}")
    chromium = os.environ.get(CHROMIUM_ENV) or DEFAULT_CHROMIUM
    if not (os.path.isfile(chromium) and os.access(chromium, os.X_OK)):
        raise BrowserMissing(f"the browser runtime needs Chromium (Debian package chromium): {chromium} is not an "
                             "executable file", hint=f"{INSTALL_HINT}, or set {CHROMIUM_ENV} to a Chromium executable")
    return Setup(node, modules, chromium)


class Browser:
    """One headless Chromium behind the node driver; requests are serialized (one page call at a time)."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile()
        config = {"nodeModules": str(setup.node_modules), "chromium": setup.chromium, "assets": str(ASSETS)}
        self._proc = subprocess.Popen([setup.node, str(ASSETS / "driver.mjs"), json.dumps(config)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)
        hello = self._proc.stdout.readline()
        try:
            ready = json.loads(hello)
        except json.JSONDecodeError:
            ready = {"ready": False, "error": self._stderr_tail() or hello.strip() or "the node driver exited"}
        if not ready.get("ready"):
            self.close()
            raise BrowserMissing(f"Chromium at {setup.chromium} did not start: {ready.get('error', '')[:300]}",
                                 hint=f"install Debian's chromium ({INSTALL_HINT}), or set {CHROMIUM_ENV}")
        self.version = ready.get("browser")

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else ""

    def request(self, op: str, **args: Any) -> Any:
        """Return the driver's result for one request; raise EdgeDistillError with the page's error."""
        with self._lock:
            if self._proc.poll() is not None:
                raise EdgeDistillError(f"the browser driver exited ({self._stderr_tail()})", hint=INSTALL_HINT)
            rid = next(self._ids)
            self._proc.stdin.write(json.dumps({"id": rid, "op": op, **args}) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        if not line:
            raise EdgeDistillError(f"the browser driver exited during '{op}' ({self._stderr_tail()})", hint=INSTALL_HINT)
        reply = json.loads(line)
        if not reply["ok"]:
            detail = f" (page console: {' | '.join(reply['console'])})" if reply.get("console") else ""
            raise EdgeDistillError(f"onnxruntime-web in Chromium failed: {reply['error'][:400]}{detail[:400]}",
                                   hint="the model may use an operator onnxruntime-web lacks; try optimization: none "
                                        "or another recipe in the profile")
        return reply["result"]

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()


_shared: dict[Setup, Browser] = {}


def shared_browser() -> Browser:
    """Return this process's browser (started once, closed at exit); raise BrowserMissing if it cannot run."""
    setup = find_setup()
    if setup not in _shared or _shared[setup]._proc.poll() is not None:
        _shared[setup] = Browser(setup)
    return _shared[setup]


@atexit.register
def _close_all() -> None:
    for b in _shared.values():
        b.close()


def encode_feeds(feeds: dict[str, np.ndarray]) -> dict[str, dict]:
    """Return the inputs as the page reads them: element type, dims, little-endian bytes in base64."""
    out = {}
    for name, v in feeds.items():
        v = np.ascontiguousarray(v)
        kind = {np.dtype(np.int64): "int64", np.dtype(np.int32): "int32", np.dtype(np.float32): "float32"}[v.dtype]
        out[name] = {"type": kind, "dims": list(v.shape), "b64": base64.b64encode(v.astype(v.dtype.newbyteorder("<")).tobytes()).decode()}
    return out


def decode_tensor(t: dict) -> np.ndarray:
    dtype = {"float32": np.float32, "int64": np.int64, "int32": np.int32}[t["type"]]
    return np.frombuffer(base64.b64decode(t["b64"]), dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(t["dims"])


class PageRunner:
    """A model in its own page: call it with feeds for its first output; `time_calls` times runs inside the page."""

    def __init__(self, browser: Browser, model_path: Path, ep: str, threads: int) -> None:
        self.browser = browser
        opened = browser.request("open", ep=ep, threads=threads)
        self.page, self.env = opened["page"], opened["env"]
        if ep == "webgpu" and self.env["webgpu"] != "adapter":
            self.close()
            raise EdgeDistillError(f"no WebGPU adapter ({self.env['webgpu']})", hint="run on a machine with a GPU Chromium can use")
        loaded = browser.request("load", page=self.page, file=str(Path(model_path).resolve()), options={"ep": ep})
        self.session, self.input_names = loaded["session"], loaded["inputNames"]
        self._uploaded: dict[int, tuple[Any, list[str]]] = {}
        self.settings = {"runtime": "onnxruntime-web", "onnxruntime_web": browser.setup.ort_web_version(),
                         "execution_provider": ep, "wasm_threads": threads if self.env["crossOriginIsolated"] else 1,
                         "cross_origin_isolated": self.env["crossOriginIsolated"], "browser": f"Chromium {browser.version} headless",
                         "graph_optimization": "all", "intra_op_spinning": False, "timing": "performance.now() in the page",
                         "fixed_input_shape": [None, None]}

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        return decode_tensor(self.browser.request("run", page=self.page, session=self.session, feeds=encode_feeds(feeds)))

    def time_calls(self, inputs: list[dict[str, np.ndarray]], start: int, n: int, settle: int) -> list[float]:
        """Return ms per call of `n` runs inside the page on inputs[(start + j) % len], after `settle` untimed
        runs; the inputs are sent to the page once per list."""
        hit = self._uploaded.get(id(inputs))
        if hit is None or hit[0] is not inputs:
            keys = [f"{id(inputs)}-{i}" for i in range(len(inputs))]
            for key, feeds in zip(keys, inputs):
                self.browser.request("upload", page=self.page, key=key,
                                     feeds=encode_feeds({k: v for k, v in feeds.items() if k in self.input_names}))
            hit = self._uploaded[id(inputs)] = (inputs, keys)
        return self.browser.request("time", page=self.page, session=self.session, keys=hit[1], start=start, n=n,
                                    settle=settle)

    def close(self) -> None:
        self.browser.request("close", page=self.page)


def webgpu_adapter(browser: Browser) -> str:
    """Return 'adapter' if the page's navigator.gpu.requestAdapter() gives one, else what it gave."""
    opened = browser.request("open", ep="webgpu", threads=1)
    browser.request("close", page=opened["page"])
    return opened["env"]["webgpu"]


def js_tokenize(tokenizer_json: Path, texts: list[str], max_length: int) -> list[list[int]]:
    """Return the page's WordPiece ids for `texts` (edgedistill/browser/wordpiece.js reading tokenizer.json)."""
    browser = shared_browser()
    opened = browser.request("open", ep="wasm", threads=1)
    try:
        return browser.request("tokenize", page=opened["page"], tokenizer=str(Path(tokenizer_json).resolve()),
                               texts=texts, maxLength=max_length)
    finally:
        browser.request("close", page=opened["page"])


def run_demo(site_dir: Path, screenshot: Path | None) -> dict:
    """Open `site_dir`/index.html as a static site, wait for its one run, screenshot it; return what it showed."""
    return shared_browser().request("demo", dir=str(Path(site_dir).resolve()), screenshot=str(screenshot) if screenshot else None)


@dataclass(frozen=True)
class OrtWebRuntime:
    """onnxruntime-web in headless Chromium, on the artifact's .onnx (the bench runtime `ort-web`, `ort-webgpu`)."""

    name: str
    ep: str = "wasm"
    model_suffix: str = ".onnx"
    rss_in_process: bool = False  # the model runs in Chromium's processes: a child Python's peak RSS says nothing

    def model_file(self, artifact_dir: Path, manifest_files: list[str]) -> Path | None:
        files = sorted(f for f in manifest_files if f.endswith(self.model_suffix))
        return artifact_dir / files[0] if files else None

    def unavailable_reason(self) -> str | None:
        """Raise BrowserMissing when the set-up is incomplete (a user error: `make install` fixes it); return why
        it cannot run here when the hardware is absent (no WebGPU adapter)."""
        browser = shared_browser()
        if self.ep == "webgpu":
            adapter = webgpu_adapter(browser)
            if adapter != "adapter":
                return f"no WebGPU adapter ({adapter})"
        return None

    def load(self, model_path: Path, threads: int) -> tuple[PageRunner, dict[str, Any]]:
        runner = PageRunner(shared_browser(), model_path, self.ep, threads)
        return runner, runner.settings


DEMO_TEXT = "A small model that runs in the browser, next to the page that asks for it."


@dataclass
class Page:
    """The browser page an artifact ships (files by artifact name) and what its one run in Chromium showed."""

    files: dict[str, Path]
    record: dict


def build_page(model_path: Path, run, tokenizer, max_length: int, input_names: list[str], task: str, config, profile,
               site_dir: Path) -> Page:
    """Return the page that runs `model_path` with onnxruntime-web (index.html, its scripts, the onnxruntime-web files,
    page.json), after opening it in Chromium as a static site: its JS tokenizer must give the Python tokenizer's ids
    and its output must be what `run` (the runtime the artifact was validated in) gives on the same text; the
    screenshot is demo.png. Its distance to native onnxruntime is recorded (int8 kernels differ between the two)."""
    from edgedistill.errors import ExportError, ProfileError
    from edgedistill.runtimes.ort_cpu import cpu_session
    from edgedistill.tokenizer_io import save_tokenizer

    setup = find_setup()
    site_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, max_length, site_dir / "tokenizer")
    spec = json.loads((site_dir / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    if spec.get("model", {}).get("type") != "WordPiece":
        raise ProfileError(f"target {profile.name}: the browser page tokenizes with WordPiece (BERT-family vocabularies); "
                           f"this teacher's tokenizer is {spec.get('model', {}).get('type')}",
                           hint="compile a BERT-family teacher for the browser, or a native target for this one")
    labels = getattr(config, "id2label", None) if task == "text-classification" else None
    page_json = {"target": profile.name, "model": "model.onnx",
                 "executionProvider": profile.execution_provider, "threads": profile.threads, "maxLength": max_length,
                 "inputNames": input_names, "task": task, "text": DEMO_TEXT,
                 "labels": [labels[i] for i in sorted(labels)] if labels else None}
    (site_dir / "page.json").write_text(json.dumps(page_json, indent=2) + "\n", encoding="utf-8")
    files = {name: ASSETS / name for name in PAGE_FILES}
    files.update({name: setup.ort_dist / name for name in ORT_FILES[profile.execution_provider]})
    files["page.json"] = site_dir / "page.json"
    for name, src in [*files.items(), ("model.onnx", model_path), ("tokenizer.json", site_dir / "tokenizer" / "tokenizer.json")]:
        if not (site_dir / name).exists():
            (site_dir / name).symlink_to(Path(src).resolve())
    shown = run_demo(site_dir, site_dir / "demo.png")
    if shown["state"] != "done":
        raise ExportError(f"the artifact's page failed in Chromium: {(shown.get('result') or {}).get('error', '')[:300]} "
                          f"(console: {' | '.join(shown.get('console') or [])[:300]})", hint="report this model")
    demo = shown["result"]
    enc = tokenizer([DEMO_TEXT], truncation=True, max_length=max_length, return_tensors="np")
    if list(enc["input_ids"][0]) != demo["input_ids"]:
        raise ExportError("the page's JavaScript tokenizer gives other ids than the Python tokenizer on the demo text",
                          hint="report this tokenizer (edgedistill/browser/wordpiece.js)")
    feeds = {k: (enc[k] if k in enc else np.zeros_like(enc["input_ids"])).astype(np.int64) for k in input_names}
    page_out = np.asarray(demo["output"], dtype=np.float32)
    validated = np.asarray(run(feeds), dtype=np.float32)[0]
    diff = float(np.max(np.abs(validated - page_out)))
    if diff > 1e-3:
        raise ExportError(f"the artifact's page output differs by {diff:.3g} from the same model validated in "
                          "onnxruntime-web on the demo text", hint="report this model")
    session = cpu_session(model_path, 1)
    native = session.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})[0][0]
    native_cos = float(np.dot(native, page_out) / (np.linalg.norm(native) * np.linalg.norm(page_out) + 1e-12))
    files["demo.png"] = site_dir / "demo.png"
    record = {"files": sorted(files), "onnxruntime_web_files": list(ORT_FILES[profile.execution_provider]),
              "runtime_files_mb": round(sum((setup.ort_dist / n).stat().st_size for n in ORT_FILES[profile.execution_provider]) / 1e6, 2),
              "demo": {"text": DEMO_TEXT, "tokens": len(demo["input_ids"]), "js_tokenizer_ids_match_python": True,
                       "max_abs_diff_vs_validated_runtime": diff,
                       "max_abs_diff_vs_native_onnxruntime": float(np.max(np.abs(native - page_out))),
                       "cosine_vs_native_onnxruntime": native_cos, "execution_provider": demo["ep"],
                       "threads": demo["threads"], "cross_origin_isolated": demo["crossOriginIsolated"],
                       "first_run_ms": round(demo["first_ms"], 2), "screenshot": "demo.png"},
              "serve": "any static server (`python3 serve.py` adds the COOP/COEP headers WASM threads need; without "
                       "them the page runs on 1 thread)"}
    return Page(files, record)
