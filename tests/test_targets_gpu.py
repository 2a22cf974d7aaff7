"""GPU profiles on a tiny teacher: fp16 for the CUDA provider, int8 QDQ for TensorRT. Without a CUDA device they are
built and checked structurally (onnx checker, fp16 weights, the provider's operator table), validated with the CPU
provider's kernels, and their latency says "not measured"; with one, the GPU tests at the end run them on it."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from conftest import tiny_workspace
from test_targets_mobile import tiny_version
from typer.testing import CliRunner

from edgedistill.artifact import verify_files
from edgedistill.cli import app
from edgedistill.coverage import check_coverage, require_coverage
from edgedistill.distill.loop import DistillConfig
from edgedistill.errors import ProfileError
from edgedistill.pipeline import CompileOptions, compile
from edgedistill.targets import builtin_profiles, load_profile_file, resolve_target

runner = CliRunner()
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TRT = "TensorrtExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def gpu_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    teacher, data = tiny_workspace(root, texts=240)
    specs = [str(tiny_version(n, root)) for n in ("nvidia-gpu-fp16", "nvidia-tensorrt-int8")]
    result = compile(str(teacher), str(data), specs, root / "out",
                     CompileOptions(distill=DistillConfig(epochs=1), cache_dir=root / "cache"))
    return {t.profile.name.removeprefix("tiny-"): t for t in result.targets}, root


def test_builtin_gpu_profiles():
    profiles = builtin_profiles()
    fp16, trt = profiles["nvidia-gpu-fp16"], profiles["nvidia-tensorrt-int8"]
    assert fp16.execution_provider == "CUDAExecutionProvider" and fp16.quantization.recipe == "fp16" and fp16.gpu
    assert trt.execution_provider == "TensorrtExecutionProvider" and trt.optimization == "none"
    assert trt.quantization.recipe == "static-qdq-int8" and trt.quantization.activation_type == "int8"


def test_fp16_artifact_has_fp16_weights_fp32_io_and_cuda_coverage(gpu_artifacts):
    targets, _ = gpu_artifacts
    t = targets["nvidia-gpu-fp16"]
    assert t.published
    m = verify_files(t.path)
    model = onnx.load(str(t.path / "model.onnx"))
    onnx.checker.check_model(model)
    types = [i.data_type for i in model.graph.initializer if len(i.dims) >= 2]  # the weight matrices
    assert types and all(ty == onnx.TensorProto.FLOAT16 for ty in types)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    # the pooling / normalization reductions stay fp32: a Cast back to float feeds them
    assert any(n.op_type == "Cast" for n in model.graph.node)
    assert m.model["structure"]["initializer_types"].get("FLOAT16", 0) > 0
    assert m.model["coverage"]["ok"] and m.model["coverage"]["provider"] == "CUDAExecutionProvider"
    assert {"com.microsoft:Attention", "com.microsoft:SkipLayerNormalization"} <= set(m.model["coverage"]["ops"])
    # fidelity was computed (on CPU kernels here); the fp16 graph stays close to the fp32 student
    assert m.metrics["values"]["cosine_mean"] > 0.5
    assert abs(m.metrics["values"]["cosine_mean"] - m.metrics["values"]["torch_student_cosine_mean"]) < 0.01


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device: latency is measured instead")
def test_gpu_latency_is_not_measured_without_a_device(gpu_artifacts):
    targets, root = gpu_artifacts
    for t in targets.values():
        lat = t.manifest.latency
        assert lat["not_measured"].startswith("no CUDA device") and "artifact" not in lat
        assert "CPUExecutionProvider" in t.manifest.model["validated_with"]
        assert all(trial["latency_ms"] is None for trial in t.manifest.quantization["trials"])  # CPU is no stand-in
        report = (t.path / "report.md").read_text()
        assert "not measured: no CUDA device" in report
    summary = (root / "out" / "summary.md").read_text()
    assert summary.count("not measured: no CUDA device") == 2


def test_tensorrt_artifact_is_symmetric_int8_qdq_without_contrib_ops(gpu_artifacts):
    targets, _ = gpu_artifacts
    t = targets["nvidia-tensorrt-int8"]
    assert t.published
    model = onnx.load(str(t.path / "model.onnx"))
    assert not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]  # TensorRT parses only ai.onnx
    inits = {i.name: i for i in model.graph.initializer}
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q
    for n in q:  # activations: int8 with zero point 0 (symmetric)
        zp = onnx.numpy_helper.to_array(inits[n.input[2]])
        assert zp.dtype == np.int8 and not zp.any()
    dq_consts = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert dq_consts and all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in dq_consts)
    assert t.manifest.model["coverage"]["ok"]
    assert t.manifest.model["coverage"]["provider"] == "TensorrtExecutionProvider"


def test_coverage_names_operators_a_provider_lacks(gpu_artifacts, tmp_path):
    targets, _ = gpu_artifacts
    fused = targets["nvidia-gpu-fp16"].path / "model.onnx"  # has com.microsoft Attention: TensorRT cannot parse it
    cov = check_coverage(fused, "TensorrtExecutionProvider")
    assert not cov.ok and "com.microsoft:Attention" in cov.unsupported
    with pytest.raises(ProfileError, match="cannot run on TensorrtExecutionProvider: operators .*com.microsoft:Attention"):
        require_coverage(fused, "TensorrtExecutionProvider")
    # a made-up operator in the default domain, computing in fp16
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Cast", ["x"], ["h"], to=onnx.TensorProto.FLOAT16),
         onnx.helper.make_node("NoSuchOp", ["h"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [2])])
    path = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    assert check_coverage(path, "CUDAExecutionProvider").unsupported == ["ai.onnx:NoSuchOp"]


def test_cli_refuses_a_gpu_profile_asking_for_what_its_provider_cannot_run(tmp_path):
    bad = {**resolve_target("nvidia-tensorrt-int8").model_dump(mode="json"), "optimization": "transformer-fusion"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ProfileError, match="optimization: none"):
        load_profile_file(path)
    result = runner.invoke(app, ["compile", "--target", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not (tmp_path / "out" / bad["name"]).exists()
    dyn = {**resolve_target("nvidia-gpu-fp16").model_dump(mode="json"), "quantization": {"recipe": "dynamic-int8"}}
    path.write_text(yaml.safe_dump(dyn))
    with pytest.raises(ProfileError, match="no dynamic int8"):
        load_profile_file(path)
    uint8 = resolve_target("nvidia-tensorrt-int8").model_dump(mode="json")
    uint8["quantization"]["activation_type"] = "uint8"
    path.write_text(yaml.safe_dump(uint8))
    with pytest.raises(ProfileError, match="symmetric int8 activations"):
        load_profile_file(path)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: CUDAExecutionProvider is not in this onnxruntime build")
def test_fp16_artifact_runs_on_cuda(gpu_artifacts):
    targets, _ = gpu_artifacts
    lat = targets["nvidia-gpu-fp16"].manifest.latency
    assert "not_measured" not in lat and lat["artifact"]["p50_ms"] > 0


@pytest.mark.skipif(not HAS_TRT, reason="no CUDA device: TensorrtExecutionProvider is not in this onnxruntime build")
def test_tensorrt_artifact_runs_on_tensorrt(gpu_artifacts):
    targets, _ = gpu_artifacts
    lat = targets["nvidia-tensorrt-int8"].manifest.latency
    assert "not_measured" not in lat and lat["artifact"]["p50_ms"] > 0
