"""`edgedistill bench` on a tiny artifact: results schema, outputs, the CI gate, and bad inputs."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import write_profile
from typer.testing import CliRunner

from edgedistill.bench.gate import GATED_FIDELITY, compare, parse_percent
from edgedistill.bench.results import BenchResult, ModelResult, ShapeLatency
from edgedistill.cli import app
from edgedistill.distill.loop import DistillConfig
from edgedistill.errors import EdgeDistillError
from edgedistill.pipeline import CompileOptions, compile

runner = CliRunner()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny compiled artifact and the paths of its teacher and data."""
    from conftest import tiny_workspace

    root = tmp_path_factory.mktemp("bench")
    teacher, data = tiny_workspace(root)
    profile = write_profile(root / "p.yaml", name="tiny-cpu")
    compile(str(teacher), str(data), [str(profile)], root / "out",
            CompileOptions(distill=DistillConfig(epochs=1), cache_dir=root / "cache"))
    return {"dir": root / "out" / "tiny-cpu", "teacher": teacher, "data": data, "root": root}


def bench_args(artifact, *extra):
    return ["bench", str(artifact["dir"]), "--teacher", str(artifact["teacher"]), "--data", str(artifact["data"]),
            "--batch", "1,2", "--seq", "16", "--min-time", "0.2", "--held-out", "50", *extra]


def test_bench_end_to_end_outputs(artifact, tmp_path):
    j, md, gh = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "gh.json"
    res = runner.invoke(app, bench_args(artifact, "--runtime", "ort-cpu,ort-cuda", "--runtime", "torch", "--json", str(j),
                                        "--markdown", str(md), "--github-benchmark", str(gh)))
    assert res.exit_code == 0, res.output
    result = BenchResult.model_validate_json(j.read_text())
    assert result.schema_version == 1
    teacher, ours, cuda = result.results
    assert teacher.role == "teacher" and teacher.runtime == "torch"
    assert ours.runtime == "ort-cpu" and ours.status == "measured"
    assert cuda.status == "not measured" and "CUDAExecutionProvider" in cuda.reason
    assert [lat.key for lat in ours.latency] == ["b1_s16_t1", "b2_s16_t1"]
    for lat in ours.latency + teacher.latency:
        assert lat.p50_ms > 0 and lat.p90_ms >= lat.p50_ms and len(lat.samples_ms) == lat.runs >= 20
        assert lat.throughput_items_s == pytest.approx(lat.batch * 1000 / lat.mean_ms)
    assert set(ours.ratio_to_teacher) == {"b1_s16_t1", "b2_s16_t1"}
    for key, rounds in ours.ratio_rounds.items():  # the ratio is the median of the timing rounds (5 by default)
        assert len(rounds) == result.settings["rounds"] == 5
        assert ours.ratio_to_teacher[key] == pytest.approx(sorted(rounds)[2], abs=1e-4)
    assert isinstance(result.machine["cpu_isa"], list)
    assert ours.accuracy["cosine_mean"] > 0.5 and 0 <= ours.accuracy["retrieval_agreement_at_10"] <= 1
    assert ours.peak_rss_mb > 0 and teacher.peak_rss_mb > ours.peak_rss_mb  # torch + transformers vs onnxruntime
    assert ours.runtime_settings["intra_op_threads"] == 1 and "cpu_mem_arena" in ours.runtime_settings
    entries = json.loads(gh.read_text())
    assert entries and all({"name", "unit", "value"} <= set(e) for e in entries)
    assert "| tiny-cpu | ort-cpu |" in md.read_text() and "not measured" in md.read_text()


def _doctored_baseline(src, dst, ratio_factor=1.0, fidelity_delta=0.0):
    data = json.loads(src.read_text())
    for r in data["results"]:
        if r["role"] == "artifact" and r["status"] == "measured":
            r["ratio_to_teacher"] = {k: v * ratio_factor for k, v in r["ratio_to_teacher"].items()}
            r["accuracy"] = {k: v + fidelity_delta for k, v in r["accuracy"].items()}
    dst.write_text(json.dumps(data))
    return dst


def test_gate_fails_on_planted_2x_slowdown_and_passes_noise(artifact, tmp_path):
    first = tmp_path / "first.json"
    assert runner.invoke(app, bench_args(artifact, "--json", str(first), "--no-memory")).exit_code == 0
    # a baseline in which the artifact was twice as fast relative to the teacher: today is a 2x slowdown
    twice_as_fast = _doctored_baseline(first, tmp_path / "fast.json", ratio_factor=0.5)
    res = runner.invoke(app, ["bench", "--suite", str(_suite(artifact, tmp_path, twice_as_fast, "50%"))])
    assert res.exit_code == 1, res.output
    assert "REGRESSED" in res.stdout
    # noise well within the limit passes: the baseline is today's result itself
    res = runner.invoke(app, ["bench", "--suite", str(_suite(artifact, tmp_path, first, "50%"))])
    assert res.exit_code == 0, res.output
    assert "no regression" in res.stdout


def _suite(artifact, tmp_path, baseline, limit):
    path = tmp_path / "suite.yaml"
    path.write_text(f"""name: test
artifacts: [{artifact['dir']}]
teacher: {artifact['teacher']}
data: {artifact['data']}
batches: [1]
sequence: 16
held_out: 50
min_time_s: 0.3
memory: false
baseline: {baseline}
max_regression: "{limit}"
""")
    return path


def _result(ratio: float, cosine: float, name: str = "a", isa: list[str] | None = None) -> BenchResult:
    lat = ShapeLatency(batch=1, sequence=16, threads=1, p50_ms=ratio, p90_ms=ratio, p99_ms=ratio, mean_ms=ratio,
                       stdev_ms=0.0, runs=20, throughput_items_s=1000 / ratio)
    teacher = ModelResult(name="t", role="teacher", runtime="torch", latency=[lat.model_copy(update={"p50_ms": 1.0})])
    art = ModelResult(name=name, role="artifact", runtime="ort-cpu", latency=[lat],
                      ratio_to_teacher={lat.key: ratio}, accuracy={"cosine_mean": cosine, "cosine_min": 0.1})
    machine = {} if isa is None else {"cpu_isa": isa}
    return BenchResult(created_utc="now", machine=machine, teacher={}, data={}, settings={}, results=[teacher, art])


def test_compare_rules():
    base = _result(0.2, 0.95)
    assert not any(r.regressed for r in compare(_result(0.21, 0.95), base, 0.10, 0.01))  # +5%: noise
    rows = compare(_result(0.4, 0.95), base, 0.10, 0.01)  # 2x slower
    assert [r.metric for r in rows if r.regressed] == ["latency/teacher b1_s16_t1"]
    rows = compare(_result(0.2, 0.93), base, 0.10, 0.01)  # fidelity drop 0.02
    assert [r.metric for r in rows if r.regressed] == ["cosine_mean"]
    assert not any(r.regressed for r in compare(_result(0.2, 0.5, name="new"), base, 0.1, 0.01)
                   if r.model == "new")  # a new artifact has nothing to regress from ...
    assert any(r.regressed and r.model == "a" for r in compare(_result(0.2, 0.5, name="new"), base, 0.1, 0.01))  # ... a vanished one fails
    assert "cosine_min" not in GATED_FIDELITY
    # latency ratios compare only on the same int8-relevant instruction sets; fidelity compares everywhere
    vnni = _result(0.2, 0.95, isa=["avx2", "avx512_vnni", "avx512f"])
    rows = compare(_result(0.4, 0.93, isa=["avx2"]), vnni, 0.10, 0.01)
    latency = [r for r in rows if r.metric.startswith("latency")]
    assert latency and not any(r.regressed for r in latency) and "not compared" in latency[0].change
    assert [r.metric for r in rows if r.regressed] == ["cosine_mean"]
    assert any(r.regressed for r in compare(_result(0.4, 0.95, isa=["avx2"]), _result(0.2, 0.95, isa=["avx2"]), 0.1, 0.01))


def test_parse_percent():
    assert parse_percent("10%") == pytest.approx(0.10) and parse_percent("0.25") == 0.25
    for bad in ("ten", "-5%"):
        with pytest.raises(EdgeDistillError):
            parse_percent(bad)


def test_bad_inputs_exit_2(artifact, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    tampered = tmp_path / "tampered"
    shutil.copytree(artifact["dir"], tampered)
    with (tampered / "model.onnx").open("ab") as f:
        f.write(b"\0")
    from conftest import build_tiny_bert

    other_teacher = build_tiny_bert(tmp_path / "other", seed=1)
    bad_suite = tmp_path / "bad.yaml"
    bad_suite.write_text("name: x\nartifacts: []\n")
    cases = {
        "no manifest": (["bench", str(empty)], "has no manifest.json"),
        "tampered": (["bench", str(tampered), "--teacher", str(artifact["teacher"])], "does not match its sha256"),
        "unknown runtime": (bench_args(artifact, "--runtime", "tpu"), "unknown runtime 'tpu'"),
        "other teacher": (["bench", str(artifact["dir"]), "--teacher", str(other_teacher)], "not the one"),
        "missing baseline": (bench_args(artifact, "--baseline", str(tmp_path / "none.json")), "does not exist"),
        "bad batch": (bench_args(artifact, "--batch", "1,x"), "positive integers"),
        "bad suite": (["bench", "--suite", str(bad_suite)], "field 'artifacts'"),
        "nothing": (["bench"], "no artifact directories"),
        "seq too long": (bench_args(artifact, "--seq", "500"), "exceeds the teacher's 64 positions"),
        "no such dir": (["bench", str(tmp_path / "nope")], "does not exist"),
        "baseline not json": (bench_args(artifact, "--baseline", str(bad_suite)), "is not JSON"),
    }
    for name, (args, expected) in cases.items():
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (name, res.output)
        assert res.stderr.startswith("error:") and expected in res.stderr, (name, res.stderr)
        assert "Traceback" not in res.stderr


def test_bench_warns_when_data_is_the_transfer_set(artifact, tmp_path):
    j = tmp_path / "r.json"
    res = runner.invoke(app, bench_args(artifact, "--no-memory", "--batch", "1", "--min-time", "0.1", "--json", str(j)))
    assert res.exit_code == 0
    assert "training texts" in BenchResult.model_validate_json(j.read_text()).data["source"]


def test_artifacts_of_one_target_are_told_apart_by_their_folders(artifact, tmp_path):
    import shutil

    copy = tmp_path / "other" / "tiny-cpu"
    shutil.copytree(artifact["dir"], copy)
    j = tmp_path / "r.json"
    res = runner.invoke(app, [*bench_args(artifact, "--json", str(j), "--no-memory", "--rounds", "1"), str(copy)])
    assert res.exit_code == 0, res.output
    names = [r.name for r in BenchResult.model_validate_json(j.read_text()).results if r.role == "artifact"]
    assert names == ["tiny-cpu (out/tiny-cpu)", "tiny-cpu (other/tiny-cpu)"], names


def test_each_artifact_is_benched_in_its_own_targets_runtime_by_default():
    from edgedistill.runtimes.registry import RUNTIMES, native_runtime
    from edgedistill.targets import builtin_profiles

    got = {name: native_runtime(p.model_dump()) for name, p in builtin_profiles().items()}
    assert got["x86-64-avx512"] == "ort-cpu" and got["arm64-mobile"] == "ort-mobile"
    assert got["android-executorch"] == "executorch" and got["nvidia-gpu-fp16"] == "ort-cuda"
    assert got["nvidia-tensorrt-int8"] == "ort-tensorrt"
    assert got["browser-wasm"] == "ort-web" and got["browser-webgpu"] == "ort-webgpu"
    for name, p in builtin_profiles().items():  # the runtime reads the file the profile writes
        assert RUNTIMES[got[name]].model_suffix == f".{p.model_format}", name
