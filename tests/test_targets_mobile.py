"""Mobile and ARM profiles on a tiny teacher: static QDQ int8, fixed shapes, ORT format with its operator config."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from conftest import make_texts
from transformers import AutoTokenizer
from typer.testing import CliRunner

from edgedistill.artifact import verify_files
from edgedistill.bench.results import BenchResult
from edgedistill.cli import app
from edgedistill.distill.loop import DistillConfig
from edgedistill.errors import ExportError
from edgedistill.pipeline import CompileOptions, compile
from edgedistill.targets import builtin_profiles, resolve_target

runner = CliRunner()


def tiny_version(name: str, tmp_path: Path, **changes) -> Path:
    """The built-in profile `name`, shrunk for a tiny model: sequence 16, 1 thread, a budget tiny models reach."""
    profile = resolve_target(name).model_dump(mode="json")
    profile.update(name=f"tiny-{name}", threads=1, input_shape={"batch": 1, "sequence": 16},
                   accuracy_budget={"min_cosine": 0.5, "min_top1_agreement": 0.5}, **changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def test_builtin_profiles_cover_cpu_mobile_and_boards():
    profiles = builtin_profiles()
    assert {"x86-64-avx2", "x86-64-avx512", "arm64-mobile", "raspberry-pi-4"} <= set(profiles)
    mobile = profiles["arm64-mobile"]
    assert mobile.model_format == "ort" and mobile.fixed_shape and mobile.arch == "arm64"
    assert mobile.quantization.recipe == "static-qdq-int8" and mobile.device_execution_providers
    assert profiles["raspberry-pi-4"].quantization.recipe == "dynamic-int8" and profiles["raspberry-pi-4"].threads == 4


@pytest.fixture(scope="module")
def mobile_artifact(tmp_path_factory):
    from conftest import tiny_workspace

    root = tmp_path_factory.mktemp("mobile")
    teacher, data = tiny_workspace(root, texts=240)
    result = compile(str(teacher), str(data), [str(tiny_version("arm64-mobile", root))], root / "out",
                     CompileOptions(distill=DistillConfig(epochs=1), cache_dir=root / "cache"))
    return result, teacher, data


def test_mobile_artifact_is_static_qdq_ort_with_fixed_shapes(mobile_artifact):
    result, _, _ = mobile_artifact
    [target] = result.targets
    assert target.published
    art = target.path
    m = verify_files(art)
    assert {"model.ort", "model.onnx", "required_operators.config"} <= set(m.files)
    assert m.model["file"] == "model.ort" and m.model["device_execution_providers"] == ["XNNPACK", "NNAPI", "CoreML"]
    # QDQ graph: MatMuls fed by DequantizeLinear, activations quantized with uint8 and weights with int8
    graph = onnx.load(str(art / "model.onnx")).graph
    dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert any(n.op_type == "MatMul" and any(i in dq for i in n.input) for n in graph.node)
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    inits = {i.name: i for i in graph.initializer}
    assert TensorProtoInt8 in {inits[n.input[0]].data_type for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    # fixed input shapes
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, 16]
    # the reduced-operator config a minimal ORT build needs lists real operators
    config = (art / "required_operators.config").read_text()
    assert "ai.onnx;" in config and ("QLinearMatMul" in config or "MatMul" in config)
    # residual Adds stay apart from their LayerNormalization (onnxruntime's SkipLayerNormalization is slower on the CPU)
    assert "SkipLayerNormalization" not in config and "LayerNormalization" in config
    # the FFN down-projections are quantized dynamically (the profile's `dynamic`), fused for the .ort
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == ops.count("DynamicQuantizeLinear") >= 1
    assert "DynamicQuantizeMatMul" in config
    # the .ort loads in onnxruntime and matches the .onnx on new text
    tok = AutoTokenizer.from_pretrained(art)
    enc = tok(make_texts(4, seed=9), padding="max_length", truncation=True, max_length=16, return_tensors="np")
    outs = []
    for f in ("model.ort", "model.onnx"):
        sess = ort.InferenceSession(str(art / f), providers=["CPUExecutionProvider"])
        outs.append(np.concatenate([sess.run(None, {k: enc[k][i:i + 1].astype(np.int64) for k in
                                                    ("input_ids", "attention_mask", "token_type_ids")})[0] for i in range(4)]))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-3)
    assert m.export["ort_format_max_abs_diff_vs_onnx"] <= 1e-3
    assert m.quantization["chosen"]["recipe"] == "static-qdq-int8" and m.quantization["trials"]
    # every candidate trial records its recipe, fidelity, size and latency here
    for t in m.quantization["trials"]:
        assert t["config"] is not None and t["fidelity"] > 0 and t["size_mb"] > 0
        assert t["latency_ms"] > 0 or t["description"].startswith("sensitivity probe")


def test_packed_4bit_gather_equals_its_table_in_onnxruntime_and_the_ort_format(tmp_path):
    """pack_token_gathers turns Gather(table, ids) into a lookup of packed 4-bit rows that onnxruntime runs, in .onnx
    and converted to .ort (which holds no INT4 tensor), equal to the unpacked table; and nothing else changes."""
    from onnx import helper, numpy_helper

    from edgedistill.ort_format import convert_to_ort
    from edgedistill.quantize.int4_rows import pack_rows_int4, pack_token_gathers, unpack_rows_int4

    table = np.random.default_rng(0).normal(size=(40, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], name="tok", axis=0),
         helper.make_node("Relu", ["rows"], ["out"], name="after")], "g",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 6])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 6, 32])], [numpy_helper.from_array(table, "table")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert pack_token_gathers(path, ["tok"], 16) == 1
    model = onnx.load(str(path))
    assert "table" not in {t.name for t in model.graph.initializer}  # the float table is gone
    ids = np.array([[0, 5, 39, 5, 12, 7]], np.int64)
    expected = np.maximum(unpack_rows_int4(*pack_rows_int4(table, 16))[ids], 0)
    assert np.abs(expected - np.maximum(table[ids], 0)).max() < np.abs(table).max() / 8  # within a 4-bit step
    ort_model = convert_to_ort(path, tmp_path / "ort").model
    for f in (path, ort_model):
        got = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_mobile_artifact_has_a_4bit_token_table_smaller_than_uint8_and_runs_as_ort(mobile_artifact, tmp_path):
    """The profile's default (embedding_bits: 4) against the same student built with a uint8 table."""
    result, teacher, data = mobile_artifact
    assert resolve_target("arm64-mobile").quantization.embedding_bits == 4
    profile = tiny_version("arm64-mobile", tmp_path, quantization={
        **resolve_target("arm64-mobile").quantization.model_dump(mode="json"), "embedding_bits": 8})
    eight = compile(str(teacher), str(data), [str(profile)], tmp_path / "out",
                    CompileOptions(distill=DistillConfig(epochs=1), cache_dir=result.targets[0].path.parent.parent / "cache"))
    [target] = result.targets
    m = verify_files(target.path)
    assert m.quantization["chosen"]["embedding_bits"] == 4
    from onnx import numpy_helper

    def weight_bytes(path: Path) -> int:  # the tiny model's file is mostly node records; a real one's is its weights
        return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)

    assert weight_bytes(target.path / "model.onnx") < weight_bytes(eight.targets[0].path / "model.onnx")
    graph = onnx.load(str(target.path / "model.onnx")).graph
    packed = [t for t in graph.initializer if t.name.endswith("_int4_packed")]
    vocab, hidden = result.student.model.config.vocab_size, result.student.model.config.hidden_size
    assert len(packed) == 1 and list(packed[0].dims) == [vocab, hidden // 2] and packed[0].data_type == onnx.TensorProto.UINT8
    assert not any(t.name.startswith("model.embeddings.word_embeddings") for t in graph.initializer)
    assert "Floor" in (target.path / "required_operators.config").read_text()
    assert m.export["ort_format_max_abs_diff_vs_onnx"] <= 1e-3


TensorProtoInt8 = onnx.TensorProto.INT8


def test_a_4bit_block_that_does_not_divide_the_table_width_is_cut_or_falls_back_to_8_bits():
    from edgedistill.families.text_encoder_stages import fit_embedding_block

    mobile = resolve_target("arm64-mobile")
    assert fit_embedding_block(mobile, 384) is mobile
    assert fit_embedding_block(mobile, 48).quantization.embedding_block_size == 16  # 48 = 3 x 16
    kept = fit_embedding_block(mobile, 312).quantization  # TinyBERT's width: no block of 16-128 divides it
    assert kept.embedding_bits == 8 and kept.recipe == mobile.quantization.recipe
    x86 = resolve_target("x86-64-avx512")
    assert fit_embedding_block(x86, 312).quantization.embedding_bits == 8


def test_bench_measures_the_ort_format_model(mobile_artifact, tmp_path):
    result, teacher, data = mobile_artifact
    j = tmp_path / "b.json"
    res = runner.invoke(app, ["bench", str(result.targets[0].path), "--teacher", str(teacher), "--data", str(data),
                              "--runtime", "ort-mobile", "--batch", "1", "--seq", "16", "--min-time", "0.2",
                              "--held-out", "40", "--no-memory", "--json", str(j)])
    assert res.exit_code == 0, res.output
    mobile = BenchResult.model_validate_json(j.read_text()).results[1]
    assert mobile.runtime == "ort-mobile" and mobile.status == "measured" and mobile.model_file == "model.ort"
    assert mobile.accuracy["cosine_mean"] > 0.5


def test_static_quantization_needs_calibration_data(tmp_path):
    from edgedistill.errors import DataError
    from edgedistill.quantize import quantize
    from edgedistill.quantize.configs import StaticQdqInt8Config

    with pytest.raises(DataError, match="calibration"):
        quantize(tmp_path / "m.onnx", StaticQdqInt8Config(), tmp_path / "q.onnx", calibration=[])


def test_executorch_artifact_runs_and_matches_the_student(tmp_path):
    from conftest import tiny_workspace

    teacher, data = tiny_workspace(tmp_path)
    result = compile(str(teacher), str(data), [str(tiny_version("android-executorch", tmp_path))], tmp_path / "out",
                     CompileOptions(distill=DistillConfig(epochs=1)))
    [target] = result.targets
    assert target.published
    m = verify_files(target.path)
    assert m.model["file"] == "model.pte" and m.model["format"] == "pte"
    assert m.quantization["chosen"]["recipe"] == "xnnpack-dynamic-int8"
    # the embedding tables are uint8, looked up by ExecuTorch's quantized kernel (before: fp32, 58% of the teacher)
    assert "quantized_decomposed::embedding_byte" in m.model["operators"], m.model["operators"]
    # a fresh process (as `verify` or a user's script) finds that kernel too, and prints no C++ cpuinfo lines
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", "import sys, numpy as np; from pathlib import Path; "
                            "from edgedistill.backends.executorch import load_pte; "
                            f"run = load_pte(Path({str(target.path / 'model.pte')!r})); "
                            "print(run({k: np.ones((1, 16), np.int64) for k in "
                            "('input_ids', 'attention_mask', 'token_type_ids')}).shape)"],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0 and probe.stdout.strip() == "(1, 32)", probe.stderr[-2000:]
    assert "cpuinfo" not in probe.stderr
    # the .pte runs in ExecuTorch's runtime and agrees with the torch student on new text
    from edgedistill.backends.executorch import load_pte

    run = load_pte(target.path / "model.pte")
    tok = AutoTokenizer.from_pretrained(target.path)
    import torch

    for text in make_texts(4, seed=11):
        enc = tok([text], padding="max_length", truncation=True, max_length=16, return_tensors="np")
        feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
        got = run(feeds)
        with torch.no_grad():
            expected = result.student(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
        cos = float(np.sum(got * expected) / (np.linalg.norm(got) * np.linalg.norm(expected)))
        assert cos > 0.99
    # bench in a fresh process (no quantized kernels imported before it), in the artifact's own runtime by default
    res = subprocess.run([sys.executable, "-c", "from edgedistill.cli import app; app()", "bench", str(target.path),
                          "--teacher", str(teacher), "--data", str(data), "--batch", "1", "--seq", "16",
                          "--min-time", "0.2", "--rounds", "2", "--held-out", "30", "--no-memory"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    [row] = [line for line in res.stdout.splitlines() if line.startswith("| tiny-android-executorch |")]
    assert "| executorch |" in row and "not measured" not in row and "cosine_mean" in row, row


def test_4bit_token_table_rounds_as_documented():
    """Embedding4bit stores what ExecuTorch's embedding_4bit reads: each block's largest magnitude maps to -8 exactly,
    every value within half a step of its own (a step at most for the opposite sign's end, clipped at +7), two values
    per byte."""
    import torch

    from edgedistill.backends.executorch import Embedding4bit

    weight = torch.randn(50, 32, generator=torch.Generator().manual_seed(0))
    table = Embedding4bit(weight, 16)
    assert table.packed.dtype == torch.uint8 and tuple(table.packed.shape) == (50, 16)
    assert tuple(table.scales.shape) == (50, 2)
    ids = torch.arange(50).view(5, 10)
    got = table(ids).reshape(50, 2, 16)
    blocks = weight.reshape(50, 2, 16)
    step = blocks.abs().amax(-1, keepdim=True) / 8
    error = (got - blocks).abs()
    inside = blocks.abs() <= 7.5 * step
    assert bool((error[inside] <= (step / 2).expand_as(error)[inside] + 1e-6).all()) and bool((error <= step + 1e-6).all())
    extreme = blocks.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(got.gather(-1, extreme), blocks.gather(-1, extreme))  # exact at -8 · scale
    with pytest.raises(ExportError, match="not a multiple"):
        Embedding4bit(torch.zeros(4, 24), 16)


def test_executorch_artifact_with_a_4bit_token_table(tmp_path):
    """embedding_bits: 4 puts the token table in ExecuTorch's embedding_4bit kernel (the other tables stay uint8), and
    the .pte equals the torch student with that table rounded so."""
    import torch
    from conftest import tiny_workspace

    from edgedistill.backends.executorch import load_pte, with_4bit_token_table

    teacher, data = tiny_workspace(tmp_path)
    profile = tiny_version("android-executorch", tmp_path, quantization={
        "recipe": "xnnpack-dynamic-int8", "embedding_bits": 4, "embedding_block_size": 16})
    result = compile(str(teacher), str(data), [str(profile)], tmp_path / "out", CompileOptions(distill=DistillConfig(epochs=1)))
    [target] = result.targets
    m = verify_files(target.path)
    ops = m.model["operators"]
    assert "quantized_decomposed::embedding_4bit" in ops and "quantized_decomposed::embedding_byte" in ops, ops
    rounded = with_4bit_token_table(result.student.eval(), result.student.model.config.vocab_size, 16)
    run = load_pte(target.path / "model.pte")
    tok = AutoTokenizer.from_pretrained(target.path)
    for text in make_texts(4, seed=12):
        enc = tok([text], padding="max_length", truncation=True, max_length=16, return_tensors="np")
        feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            expected = rounded(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
        got = run(feeds)
        assert float(np.sum(got * expected) / (np.linalg.norm(got) * np.linalg.norm(expected))) > 0.99


def test_profile_asking_for_a_recipe_its_runtime_cannot_run_is_rejected(tmp_path):
    from edgedistill.errors import ProfileError

    bad = tiny_version("android-executorch", tmp_path, quantization={"recipe": "static-qdq-int8"})
    with pytest.raises(ProfileError, match="cannot run quantization recipe 'static-qdq-int8'"):
        resolve_target(str(bad))


def test_multi_target_compile_writes_summary(tmp_path):
    from conftest import tiny_workspace, write_profile

    teacher, data = tiny_workspace(tmp_path)
    targets = [str(write_profile(tmp_path / "a.yaml", name="cpu-a")), str(tiny_version("arm64-mobile", tmp_path)),
               str(write_profile(tmp_path / "strict.yaml", name="strict", min_cosine=0.99999))]
    result = compile(str(teacher), str(data), targets, tmp_path / "out", CompileOptions(distill=DistillConfig(epochs=1)))
    assert [t.published for t in result.targets] == [True, True, False]
    summary = (tmp_path / "out" / "summary.md").read_text()
    for name in ("cpu-a", "tiny-arm64-mobile", "strict"):
        assert f"| {name} |" in summary
    assert "model.ort" in summary and "**FAIL**" in summary
    # one distillation for the three targets (the same figure in each manifest), each target's build its own
    timings = [t.manifest.timings for t in result.targets]
    assert len({t["distill_s"] for t in timings}) == 1 and all(t["targets"] == 3 for t in timings)
    assert "(shared by the 3 targets)" in (tmp_path / "out" / "strict.rejected.md").read_text()


def test_xnnpack_static_int8_fuses_relu6_into_the_convolution_and_quantizes_after_the_clamp(tmp_path):
    """ReLU6 (aten.hardtanh) after a convolution: XNNPACKQuantizer alone quantizes the convolution's output over its
    whole range and the clamp shares it; annotate_conv_clamps quantizes only after the clamp, and XNNPACK runs the
    pair as one convolution with a fused clamp."""
    import torch
    from torch import nn

    from edgedistill.backends.executorch import load_pte, lower_to_pte, quantize_for_xnnpack

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():  # outputs far outside [0, 6] before the clamps: most levels of a whole-range scale are wasted
        net[0].weight.mul_(16.0)
        net[3].weight.mul_(16.0)
    x = torch.rand(1, 3, 16, 16)
    calib = [(torch.rand(1, 3, 16, 16),) for _ in range(16)]
    exported = torch.export.export(net, (x,))
    quantized = quantize_for_xnnpack(exported, (x,), calib, per_channel=True, dynamic=False)
    graph = quantized.graph
    clamps = [n for n in graph.nodes if n.op == "call_function" and "hardtanh" in str(n.target)]
    assert len(clamps) == 2
    for clamp in clamps:  # the convolution feeds the clamp directly; one quantize after the clamp
        conv = clamp.args[0]
        assert "conv" in str(conv.target) and list(conv.users) == [clamp]
        (q,) = clamp.users
        assert "quantize_per_tensor" in str(q.target)
        scale = float(q.args[1])
        assert scale <= 6.0 / 255 * 1.05, scale  # the clamp's range, not the convolution's
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                        get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    plain = prepare_pt2e(torch.export.export(net, (x,)).module(),  # XNNPACK's quantizer as it ships
                         XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True)))
    for inputs in calib:
        plain(*inputs)
    with torch.no_grad():
        want = net(x).numpy()
    errors = {}
    for name, program in (("fused", quantized), ("plain", torch.export.export(convert_pt2e(plain), (x,)))):
        path = tmp_path / f"{name}.pte"
        path.write_bytes(lower_to_pte(program))
        errors[name] = float(np.abs(load_pte(path)({"pixels": x.numpy()}) - want).mean())
    assert errors["fused"] < 0.7 * errors["plain"], errors  # measured 0.017 vs 0.031
