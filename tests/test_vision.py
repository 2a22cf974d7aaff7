"""Vision end to end on a tiny MobileNetV2 teacher (width 0.25, 10 classes, 64x64): the pruned, distilled student's
artifact loads in onnxruntime, matches the torch student, is int8 where the profile says, verifies; bad options and
targets without a vision section get one line and exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from edgedistill.artifact import verify_files
from edgedistill.cli import app
from edgedistill.distill.loop import DistillConfig
from edgedistill.families import vision_stages, vision_training, vision_validation
from edgedistill.pipeline import CompileOptions, compile
from edgedistill.reverify import revalidate
from edgedistill.teachers import vision
from edgedistill.teachers.vision_archs import mobilenet_v2

runner = CliRunner()


@pytest.fixture
def tiny_teacher(tmp_path, monkeypatch) -> str:
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10, width_mult=0.25)
    # a teacher whose logits differ between images: BatchNorm statistics of real activations (at init, eval-mode
    # ReLU6 saturates and every image gets the same ~1e-9 logits) and a classifier of unit-variance weights
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(32, 3, 64, 64))
    torch.nn.init.normal_(model.classifier[1].weight, std=1.0)
    model.eval()
    weights = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), weights)
    spec = vision.VisionTeacherSpec(lambda: mobilenet_v2(num_classes=10, width_mult=0.25), "none", "none", "tiny.pth",
                                    vision.Preprocess(vision.IMAGENET_MEAN, vision.IMAGENET_STD, 73, 64), 0.0, "test")
    monkeypatch.setitem(vision.BUILTIN_VISION_TEACHERS, "tiny-cnn", spec)
    real = vision.builtin_vision_weights
    monkeypatch.setattr(vision, "builtin_vision_weights", lambda name: weights if name == "tiny-cnn" else real(name))
    monkeypatch.setattr(vision_stages, "TRAIN_VIEWS", 48)
    return "tiny-cnn"


@pytest.fixture
def photos(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:120]
    images = []
    for i in range(12):  # smooth colour fields with a blob: something a CNN responds to differently per image
        base = np.stack([np.sin(xx / (7 + i)) , np.cos(yy / (5 + i)), np.sin((xx + yy) / (9 + i))], -1)
        blob = np.exp(-(((xx - rng.integers(20, 100)) ** 2 + (yy - rng.integers(20, 76)) ** 2) / 300.0))[..., None]
        images.append(((base * 0.4 + blob * rng.uniform(-1, 1, 3) + 0.5).clip(0, 1) * 255).astype(np.uint8))
    path = tmp_path / "photos.npz"
    np.savez(path, images=np.stack(images))
    return path


def profile(path: Path, quantization: str, name: str = "tiny-vision") -> Path:
    path.write_text(f"""name: {name}
threads: 1
quantization: {{recipe: fp32}}
vision:
  quantization: {quantization}
  budget: {{min_top1_agreement: 0.0}}
""")
    return path


def opts(**kw) -> CompileOptions:
    return CompileOptions(distill=DistillConfig(epochs=1, batch_size=16), **kw)


def test_fp32_artifact_matches_the_pruned_distilled_student(tiny_teacher, photos, tmp_path):
    result = compile(tiny_teacher, str(photos), [str(profile(tmp_path / "p.yaml", "{recipe: fp32}"))], tmp_path / "out",
                     opts(macs_ratio=0.5, resolution=64))  # the input's own side: channels pruned alone
    target = result.targets[0]
    assert target.published
    m = verify_files(target.path)
    assert m.family == "vision" and m.model["inputs"] == ["pixels"] and m.student["pruning"]["resolution"] == 64
    p = m.student["pruning"]
    assert p["student_macs"] <= 0.5 * p["teacher_macs"] and m.student["num_parameters"] < m.teacher["num_parameters"]
    # 12 photos: too few to hold any out, so the held-out views are other crops of them
    assert not m.data["photos_held_out"] and m.data["num_train"] == 12 * 4 and m.data["num_validation"] == 12 * 9
    views = np.load(target.path / "validation-views.npy")
    x = views[:4].astype(np.float32) / 255.0
    session = ort.InferenceSession(str(target.path / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = result.student(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"pixels": x})[0], expected, atol=1e-4)
    v = m.metrics["values"]
    assert abs(v["top1_agreement"] - v["torch_student_top1_agreement"]) < 1e-9  # fp32: the same predictions
    assert m.latency["artifact"]["p50_ms"] > 0 and m.latency["speedup_vs_teacher"] > 0
    verified = runner.invoke(app, ["verify", str(target.path)])
    assert verified.exit_code == 0, verified.output


def test_a_lower_resolution_student_keeps_the_teachers_layers_and_resizes_inside(tiny_teacher, photos, tmp_path):
    from edgedistill.families.vision import auto_resolution, count_macs

    big = mobilenet_v2(num_classes=10, width_mult=0.25)
    assert [auto_resolution(big, 224, r) for r in (1.0, 0.7, 0.5, 0.35, 0.1)] == [224, 192, 160, 128, 112]
    assert count_macs(big, 160) <= 0.525 * count_macs(big, 224)
    result = compile(tiny_teacher, str(photos), [str(profile(tmp_path / "p.yaml", "{recipe: fp32}"))], tmp_path / "out",
                     opts(macs_ratio=0.5))  # spent on the input side first
    target = result.targets[0]
    m = verify_files(target.path)
    p = m.student["pruning"]
    assert p["resolution"] == auto_resolution(big, 64, 0.5) < 64 and p["channel_ratio"] == 0.0, p  # MACs: weights aside
    assert p["student_macs"] <= 0.5 * p["teacher_macs"] and m.student["num_parameters"] == m.teacher["num_parameters"]
    import onnx

    graph = onnx.load(target.path / "model.onnx").graph
    assert "Resize" in [n.op_type for n in graph.node]
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1:] == [3, 64, 64]  # the teacher's input
    x = np.load(target.path / "validation-views.npy")[:4].astype(np.float32) / 255.0
    session = ort.InferenceSession(str(target.path / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = result.student(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"pixels": x})[0], expected, rtol=1e-4, atol=1e-4)
    assert f"resizes its 64-pixel input to {p['resolution']}×{p['resolution']}" in (target.path / "report.md").read_text()
    for bad in (["--resolution", "4"], ["--resolution", "65"]):
        res = runner.invoke(app, ["compile", tiny_teacher, "--data", str(photos), "--out", str(tmp_path / "o2"),
                                  "--target", str(profile(tmp_path / "p.yaml", "{recipe: fp32}")), *bad])
        assert res.exit_code == 2 and "--resolution" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
        assert not (tmp_path / "o2").exists()


def test_int8_artifact_is_quantized_and_its_trials_recorded(tiny_teacher, photos, tmp_path):
    q = "{recipe: static-qdq-int8, op_types: [Conv, Gemm], calibration_texts: 8, search: false}"
    result = compile(tiny_teacher, str(photos), [str(profile(tmp_path / "p.yaml", q))], tmp_path / "out", opts())
    m = verify_files(result.targets[0].path)
    ops = m.quantization["operators"]
    assert ops.get("QuantizeLinear", 0) > 10 and ops.get("DequantizeLinear", 0) > 10, ops
    assert m.quantization["trials"][0]["description"] == "as the profile says"
    # int8 weights; the rest of a tiny model's file is scales, int32 biases and names (GPTQ exports the BatchNorm-
    # folded student with its parameter names: 0.512 of the teacher, the tensors byte for byte as large as nearest's)
    assert m.sizes["model_mb"] < 0.55 * m.sizes["teacher_weights_mb"]
    v = m.metrics["values"]
    assert 0.0 <= v["top1_agreement_low95"] <= v["top1_agreement"] <= v["top1_agreement_high95"] <= 1.0
    assert "95% interval over the held-out photos" in (result.targets[0].path / "report.md").read_text()
    # the artifact carries which held-out photo each view is of, so verify (and the bench) re-derive the interval
    art = result.targets[0].path
    photos_of = np.load(art / "validation-photos.npy")
    assert "validation-photos.npy" in m.files and len(photos_of) == m.data["num_validation"]
    assert len(np.unique(photos_of)) == m.data["num_validation_images"]
    verified = runner.invoke(app, ["verify", str(art)])
    assert verified.exit_code == 0 and "95% interval over the held-out photos" in verified.output, verified.output
    again = revalidate(art, m)
    assert again.measured["top1_agreement_low95"] == pytest.approx(v["top1_agreement_low95"])
    assert again.measured["top1_agreement_high95"] == pytest.approx(v["top1_agreement_high95"])


QAT_INT8 = "{recipe: static-qdq-int8, op_types: [Conv, Gemm, Clip], calibration_texts: 8, search: false}"


def test_quantization_aware_student_is_what_its_int8_artifact_computes(tiny_teacher, photos, tmp_path):
    """Asked for, a pruned student distils in float for half the steps, then through the simulated int8 rounding,
    BatchNorm folded; the artifact's logits are closer to the rounded student's than to its float weights'.

    Not equal: the grids are onnxruntime's exactly (test_qat_conv), but float convolutions in torch and onnxruntime
    round differently in the last bit, a value on a rounding boundary lands one step apart, and over 50 layers that
    grows. Measured on this tiny student with onnxruntime's graph optimizations off (plain QDQ arithmetic): the
    first convolution's output differs by at most 1 step (mean 0.003), the 8th by 3, the last ones by 10-40; mean
    |artifact - rounded| / |artifact - float| was 0.74 on an AMD EPYC with AVX-512 VNNI and 0.97 on one with AVX2."""
    from edgedistill.distill.qat_conv import ConvQuantSim

    result = compile(tiny_teacher, str(photos), [str(profile(tmp_path / "p.yaml", QAT_INT8))], tmp_path / "out",
                     opts(quantization_aware=True, macs_ratio=0.5, resolution=64))  # channels pruned
    m = verify_files(result.targets[0].path)
    qat = m.distillation["quantization_aware"]
    assert qat["calibration_views"] == 8 and qat["from_step"] == 1  # 48 views / 16 per batch, 1 epoch: step 1 of 3
    assert m.student["pruning"]["batchnorm_folded"] > 10
    student = result.student.eval()
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in student.modules())
    views = np.load(result.targets[0].path / "validation-views.npy")[:32]
    x = torch.from_numpy(views).float() / 255.0
    session = ort.InferenceSession(str(result.targets[0].path / "model.onnx"), providers=["CPUExecutionProvider"])
    artifact = session.run(None, {"pixels": x.numpy()})[0]
    with torch.no_grad():
        floating = student(x).numpy()
    train_views = result.distilled.train_views
    sim = ConvQuantSim(student, x[:1])
    sim.calibrate(torch.from_numpy(vision_stages.calibration_views(train_views, 8)).float() / 255.0)
    with torch.no_grad():
        rounded = student(x).numpy()
    sim.remove()
    assert np.abs(artifact - rounded).mean() < np.abs(artifact - floating).mean()


def test_the_teacher_shape_distils_quantization_aware_at_a_small_rate_when_asked(tiny_teacher, photos, tmp_path):
    cfg = DistillConfig()
    assert vision_stages.distill_config(cfg, 64, True).lr == vision_stages.TEACHER_SHAPE_QAT_LR == 1e-5
    assert vision_stages.distill_config(cfg, 64, False).lr == vision_stages.distill_config(cfg, None, True).lr == 3e-4
    assert vision_stages.distill_config(DistillConfig(lr=2e-4), 64, True).lr == 2e-4  # --lr wins
    result = compile(tiny_teacher, str(photos), [str(profile(tmp_path / "p.yaml", QAT_INT8))], tmp_path / "out",
                     opts(macs_ratio=1.0, quantization_aware=True))
    m = verify_files(result.targets[0].path)
    assert m.distillation["quantization_aware"] and m.distillation["config"]["lr"] == 1e-5  # recorded resolved


def test_one_quantization_aware_student_needs_one_weight_grid():
    """x86-64-avx2 stores 7-bit weights (reduce_range), x86-64-avx512 8-bit ones: a student can train through one."""
    from edgedistill.errors import EdgeDistillError
    from edgedistill.targets import builtin_profiles

    avx2, avx512 = builtin_profiles()["x86-64-avx2"], builtin_profiles()["x86-64-avx512"]
    assert avx2.vision.quantization.reduce_range and not avx512.vision.quantization.reduce_range
    assert vision_stages.quantization_aware([avx2], None) == (64, 64)
    assert vision_stages.quantization_aware([avx512], None) == (64, 127)
    assert vision_stages.quantization_aware([avx2, avx512], None) is None
    with pytest.raises(EdgeDistillError, match="one calibration set and one weight grid"):
        vision_stages.quantization_aware([avx2, avx512], True)


def test_quantization_aware_can_be_turned_off_and_refuses_a_target_it_cannot_simulate(tiny_teacher, photos, tmp_path):
    result = compile(tiny_teacher, str(photos), [str(profile(tmp_path / "p.yaml", QAT_INT8))], tmp_path / "out",
                     opts(quantization_aware=False))
    m = verify_files(result.targets[0].path)
    assert m.distillation["quantization_aware"] is None and "batchnorm_folded" not in m.student["pruning"]
    # the teacher's own shape in float: its step 0 agrees 1.0 already, which the best-step choice keeps: not trained
    assert m.distillation["history"] == [] and m.distillation["best_validation_top1_agreement"] == 1.0
    assert "no training step can beat" in m.student["pruning"]["not_distilled"]
    report = (result.targets[0].path / "report.md").read_text()
    assert "Not distilled: the student is the teacher" in report and "never beat" not in report
    # by default: on for the teacher's layers at a lower resolution (from the first step); off for a channel-pruned
    # student and for the teacher's own shape, which is rounded by GPTQ instead, untrained (measured)
    pruned = compile(tiny_teacher, str(photos), [str(profile(tmp_path / "p.yaml", QAT_INT8))], tmp_path / "o1",
                     opts(macs_ratio=0.5, resolution=64))
    assert verify_files(pruned.targets[0].path).distillation["quantization_aware"] is None
    smaller = compile(tiny_teacher, str(photos), [str(profile(tmp_path / "p.yaml", QAT_INT8))], tmp_path / "o4",
                      opts(resolution=32))
    m = verify_files(smaller.targets[0].path)
    assert m.distillation["quantization_aware"]["from_step"] == 0 and m.student["pruning"]["resolution"] < 64
    assert m.distillation["config"]["lr"] == vision_stages.TEACHER_SHAPE_QAT_LR
    whole = compile(tiny_teacher, str(photos), [str(profile(tmp_path / "p.yaml", QAT_INT8))], tmp_path / "o3",
                    opts(macs_ratio=1.0))
    m = verify_files(whole.targets[0].path)
    assert m.distillation["quantization_aware"] is None and m.distillation["history"] == []
    assert m.quantization["weight_rounding"]["method"].startswith("gptq"), m.quantization["weight_rounding"]
    res = runner.invoke(app, ["compile", tiny_teacher, "--data", str(photos), "--out", str(tmp_path / "o2"),
                              "--target", str(profile(tmp_path / "f.yaml", "{recipe: fp32}")), "--quantization-aware"])
    assert res.exit_code == 2 and "--quantization-aware trains for static int8" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1


def test_mobile_target_ships_a_fixed_shape_ort_model_validated_as_run(tiny_teacher, photos, tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(f"""name: tiny-mobile
threads: 1
arch: arm64
model_format: ort
fixed_shape: true
quantization: {{recipe: fp32}}
vision:
  quantization: {QAT_INT8}
  budget: {{min_top1_agreement: 0.0}}
""")
    result = compile(tiny_teacher, str(photos), [str(path)], tmp_path / "out", opts())
    art = result.targets[0].path
    m = verify_files(art)
    assert m.model["file"] == "model.ort" and m.model["format"] == "ort" and (art / "required_operators.config").is_file()
    assert m.export["fixed_batch"] == 1 and m.export["ort_format_max_abs_diff_vs_onnx"] < 1e-4
    session = ort.InferenceSession(str(art / "model.ort"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 64, 64]
    assert m.sizes["model_mb"] == pytest.approx((art / "model.ort").stat().st_size / 1e6)
    views = np.load(art / "validation-views.npy")
    logits = np.concatenate([session.run(None, {"pixels": v[None].astype(np.float32) / 255.0})[0] for v in views])
    teacher = np.load(art / "validation-teacher.npy")
    agree = float((logits.argmax(-1) == teacher.argmax(-1)).mean())
    assert agree == pytest.approx(m.metrics["values"]["top1_agreement"], abs=1e-6)
    verified = runner.invoke(app, ["verify", str(art)])
    assert verified.exit_code == 0, verified.output


def test_keep_rejected_writes_the_whole_rejected_artifact(tiny_teacher, photos, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: tiny-vision\nthreads: 1\nquantization: {recipe: fp32}\nvision:\n  quantization: {recipe: fp32}\n"
                    "  budget: {min_top1_agreement: 1.0}\n")
    res = runner.invoke(app, ["compile", tiny_teacher, "--data", str(photos), "--out", str(tmp_path / "out"),
                              "--target", str(path), "--epochs", "1", "--batch-size", "16", "--keep-rejected",
                              "--macs-ratio", "0.5", "--resolution", "64"])
    assert res.exit_code == 2 and "a larger --macs-ratio" in res.stderr, res.output
    kept = tmp_path / "out" / "tiny-vision.rejected"
    m = verify_files(kept)  # hashes match: whole, not half-written
    assert not m.metrics["passed"] and "REJECTED" in (kept / "report.md").read_text()
    assert (tmp_path / "out" / "tiny-vision.rejected.md").is_file() and not (tmp_path / "out" / "tiny-vision").exists()
    # the default student has the teacher's layers: the hint does not ask for a larger one
    path.write_text(f"name: tiny-vision\nthreads: 1\nquantization: {{recipe: fp32}}\nvision:\n  quantization: {QAT_INT8}\n"
                    "  budget: {min_top1_agreement: 1.0}\n")
    res = runner.invoke(app, ["compile", tiny_teacher, "--data", str(photos), "--out", str(tmp_path / "o2"),
                              "--target", str(path), "--epochs", "1", "--batch-size", "16"])
    assert res.exit_code == 2 and "a lower vision budget in the target profile" in res.stderr, res.output


@pytest.mark.parametrize("case", ["lm-option", "no-vision-section", "macs-ratio", "crop-scale", "resize", "mixup-alone",
                                  "feature-weight:-1", "feature-weight:nan", "feature-weight-resized"])
def test_bad_vision_input_one_line_exit_2(case, tiny_teacher, photos, tmp_path):
    args = ["compile", tiny_teacher, "--data", str(photos), "--out", str(tmp_path / "out")]
    if case == "lm-option":
        args += ["--target", str(profile(tmp_path / "p.yaml", "{recipe: fp32}")), "--student-layers", "2"]
        expected = "--student-layers does not apply to image classifiers"
    elif case == "no-vision-section":
        (tmp_path / "p.yaml").write_text("name: textonly\nthreads: 1\nquantization: {recipe: fp32}\n")
        args += ["--target", str(tmp_path / "p.yaml")]
        expected = "has no vision section"
    elif case == "macs-ratio":
        args += ["--target", str(profile(tmp_path / "p.yaml", "{recipe: fp32}")), "--macs-ratio", "1.5"]
        expected = "--macs-ratio 1.5 is out of range"
    elif case == "crop-scale":
        args += ["--target", str(profile(tmp_path / "p.yaml", "{recipe: fp32}")), "--crop-scale", "0"]
        expected = "--crop-scale 0.0 is out of range"
    elif case == "resize":
        args += ["--target", str(profile(tmp_path / "p.yaml", "{recipe: fp32}")), "--resize", "32"]
        expected = "--resize 32 is smaller than the 64-pixel input"
    elif case == "mixup-alone":
        args += ["--target", str(profile(tmp_path / "p.yaml", "{recipe: fp32}")), "--mixup", "0.2"]
        expected = "--mixup 0.2 needs --fresh-views"
    elif case == "feature-weight-resized":  # half the MACs are spent on the input side first: the maps differ
        args += ["--target", str(profile(tmp_path / "p.yaml", "{recipe: fp32}")), "--feature-weight", "1",
                 "--macs-ratio", "0.5"]
        expected = "so its maps are smaller (hint: add --resolution 64 to prune channels only"
    else:
        args += ["--target", str(profile(tmp_path / "p.yaml", "{recipe: fp32}")), "--feature-weight", case.split(":")[1]]
        expected = f"--feature-weight {case.split(':')[1]} is not a weight >= 0"
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert expected in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "out" / "tiny-vision").exists()


def test_crop_options_are_refused_outside_vision(tmp_path):
    from conftest import tiny_workspace

    teacher, data = tiny_workspace(tmp_path)
    # encoders take --feature-weight (their token-state loss), refusing what is not a weight, in one line
    res = runner.invoke(app, ["compile", str(teacher), "--data", str(data), "--out", str(tmp_path / "out"),
                              "--feature-weight", "-1"])
    assert res.exit_code == 2 and "--feature-weight -1 is not a weight >= 0" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    for flag in ("--crop-scale", "--resize", "--drop-blocks"):
        res = runner.invoke(app, ["compile", str(teacher), "--data", str(data), "--out", str(tmp_path / "out"),
                                  flag, "1"])
        assert res.exit_code == 2 and f"{flag} does not apply to text encoders" in res.stderr, res.output


def test_pruning_a_narrow_network_lands_near_the_macs_share():
    """Channel counts in multiples of 8 give 13% of the MACs for a 25% share on 32-128 channels (measured on the
    Fashion-MNIST teacher); the finer count is kept when rounding lands that far under."""
    from torch import nn

    from edgedistill.families.vision import prune_to_macs

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    net = nn.Sequential(*block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    _, record = prune_to_macs(net, 28, 0.25)
    assert 0.9 * 0.25 <= record["macs_ratio"] <= 0.25 and record["channels_rounded_to"] == 1, record
    _, mobile = prune_to_macs(mobilenet_v2(num_classes=10, width_mult=0.5), 64, 0.5)
    assert mobile["channels_rounded_to"] == 8 and 0.45 <= mobile["macs_ratio"] <= 0.5, mobile


def test_drop_blocks_leaves_out_the_residual_blocks_that_matter_least():
    from torch import nn

    from edgedistill.errors import EdgeDistillError
    from edgedistill.families.vision import count_macs, drop_blocks, droppable_blocks
    from edgedistill.teachers.vision_archs import InvertedResidual

    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10, width_mult=0.25)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.momentum = None  # the cumulative average: one batch sets the statistics
    nn.init.normal_(model.classifier[1].weight, std=1.0)  # logits that differ between images (init's are near zero)
    with torch.no_grad():  # BatchNorm statistics of real activations, else ReLU6 saturates and every output is alike
        model.train()(torch.rand(32, 3, 64, 64))
    model.eval()
    names = droppable_blocks(model, 64)
    residual = [m for m in model.modules() if isinstance(m, InvertedResidual) and m.use_residual]
    assert len(names) == len(residual) and all(model.get_submodule(n).use_residual for n in names), names
    planted = names[3]  # its residual branch made exactly zero: leaving it out changes nothing, so it goes first
    nn.init.zeros_(model.get_submodule(planted).conv[-1].weight)
    nn.init.zeros_(model.get_submodule(planted).conv[-1].bias)
    x = torch.rand(8, 3, 64, 64)
    student, record = drop_blocks(model, 64, x, 2)
    first, second = record["dropped_blocks"]
    assert first["block"] == planted and first["kl_after"] < 1e-6 and second["block"] != planted, record
    assert isinstance(student.get_submodule(planted), nn.Identity)
    assert not isinstance(model.get_submodule(planted), nn.Identity)  # the teacher is untouched
    assert count_macs(student, 64) < count_macs(model, 64)
    with torch.no_grad():
        kl = torch.nn.functional.kl_div(student(x).log_softmax(-1), model(x).log_softmax(-1), log_target=True,
                                        reduction="batchmean")
    assert abs(float(kl) - second["kl_after"]) < 1e-4
    with pytest.raises(EdgeDistillError, match=f"has {len(names)} residual blocks"):
        drop_blocks(model, 64, x, len(names) + 1)


def test_only_residual_blocks_are_droppable():
    from torch import nn

    from edgedistill.families.vision import droppable_blocks

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    same_shape = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())  # not residual
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), same_shape, Residual(), nn.Sequential(Residual(), Residual()),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    assert droppable_blocks(net, 16) == ["2", "3.0", "3.1"]


def test_a_depth_pruned_student_compiles_and_records_its_dropped_blocks(tiny_teacher, photos, tmp_path):
    result = compile(tiny_teacher, str(photos), [str(profile(tmp_path / "p.yaml", "{recipe: fp32}"))], tmp_path / "out",
                     opts(macs_ratio=0.6, drop_blocks=3, resolution=64))
    target = result.targets[0]
    p = verify_files(target.path).student["pruning"]
    assert len(p["dropped_blocks"]) == 3 and p["student_macs"] <= 0.6 * p["teacher_macs"], p
    dropped = [b["block"] for b in p["dropped_blocks"]]
    assert all(isinstance(result.student.get_submodule(b), torch.nn.Identity) for b in dropped)
    x = np.load(target.path / "validation-views.npy")[:4].astype(np.float32) / 255.0
    session = ort.InferenceSession(str(target.path / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"pixels": x})[0], result.student(torch.from_numpy(x)).numpy(),
                                   atol=1e-4)
    res = runner.invoke(app, ["compile", tiny_teacher, "--data", str(photos), "--out", str(tmp_path / "out2"),
                              "--target", str(profile(tmp_path / "p.yaml", "{recipe: fp32}")), "--drop-blocks", "40"])
    assert res.exit_code == 2 and "residual blocks that can be dropped" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1


def test_the_agreement_interval_resamples_photos_not_views():
    teacher = np.eye(3)[np.zeros(200, dtype=int)]
    hits = np.repeat([True, True, False, False], 50)  # 4 photos of 50 alike views: two agree, two do not
    ours = np.where(hits[:, None], teacher, np.eye(3)[np.ones(200, dtype=int)])
    low, high = vision_validation.agreement_interval(ours, teacher, np.repeat(np.arange(4), 50))
    assert low <= 0.25 and high >= 0.75  # 4 photos say little, however many views they are cut into
    low, high = vision_validation.agreement_interval(ours, teacher, np.arange(200))  # 200 separate photos say more
    assert 0.4 < low < 0.5 < high < 0.6
    assert vision_validation.agreement_interval(teacher, teacher, np.repeat(np.arange(4), 50)) == (1.0, 1.0)


def test_photos_are_held_out_whole_when_there_are_enough():
    train, val, held_out = vision_stages.split_images(60, 0.05, 0)  # 5% would be 3 photos: a third (20) at most
    assert held_out and len(val) == 20 and not set(train) & set(val) and len(train) + len(val) == 60
    assert len(vision_stages.split_images(150, 0.05, 0)[1]) == vision_stages.MIN_HELD_OUT_PHOTOS  # not 8
    assert len(vision_stages.split_images(1000, 0.05, 0)[1]) == 50
    train, val, held_out = vision_stages.split_images(12, 0.05, 0)
    assert not held_out and list(train) == list(val) == list(range(12))


def test_the_readme_jpeg_snippet_classifies_as_the_artifact_was_validated(tiny_teacher, photos, tmp_path):
    """The README's Pillow + numpy + onnxruntime lines give the artifact's logits on the validated center crop."""
    import re

    from PIL import Image

    from edgedistill.images import make_views

    result = compile(tiny_teacher, str(photos), [str(profile(tmp_path / "p.yaml", "{recipe: fp32}"))], tmp_path / "out",
                     opts())
    art = result.targets[0].path
    image = np.load(photos)["images"][3]
    Image.fromarray(image).save(tmp_path / "photo.png")  # lossless: the same pixels the views were made from
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(import json, numpy as np, onnxruntime as ort\nfrom PIL import Image\n\nart, photo.*?)```",
                     readme, re.S).group(1)
    code = code.replace('"build/vision/x86-64-avx512", "photo.jpg"', f'"{art}", "{tmp_path / "photo.png"}"')
    assert "256" not in code and "224" not in code  # the sizes come from the manifest (73 / 64 for the tiny teacher)
    scope: dict = {}
    exec(compile_code(code), scope)  # noqa: S102 (our own README)
    view, _ = make_views([image], 1, 64, 0, train=False)
    session = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"pixels": view.astype(np.float32) / 255.0})[0][0]
    np.testing.assert_allclose(scope["logits"], expected, atol=1e-5)


def compile_code(code: str):
    import builtins

    return builtins.compile(code, "README.md", "exec")


FACTORY = '''
from edgedistill.teachers.vision_archs import mobilenet_v2


def build(num_classes=10, width=0.25):
    return mobilenet_v2(num_classes=num_classes, width_mult=width)


def broken(**kwargs):
    raise ValueError("no such width")
'''


@pytest.fixture
def user_weights(tmp_path, monkeypatch) -> dict[str, Path]:
    """A user's tiny CNN as a state dict (.pt, .safetensors), its factory module, and a torch.export program."""
    from safetensors.torch import save_file

    (tmp_path / "usermodels.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10, width_mult=0.25).eval()
    paths = {"pt": tmp_path / "cnn.pt", "safetensors": tmp_path / "cnn.safetensors", "pt2": tmp_path / "cnn.pt2"}
    torch.save(model.state_dict(), paths["pt"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(paths["safetensors"]))
    program = torch.export.export(model, (torch.rand(2, 3, 64, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(paths["pt2"]))
    paths["model"] = model
    return paths


@pytest.mark.parametrize("kind", ["safetensors", "pt2"])
def test_a_users_model_compiles_with_its_normalization_inside(kind, user_weights, photos, tmp_path):
    o = opts(normalize="0.5,0.5,0.5/0.25,0.25,0.25", image_size=64, quantization_aware=False,
             arch="usermodels:build" if kind != "pt2" else None, arch_kwargs={"num_classes": 10} if kind != "pt2" else None,
             macs_ratio=0.5 if kind != "pt2" else None)
    result = compile(str(user_weights[kind]), str(photos), [str(profile(tmp_path / "p.yaml", "{recipe: fp32}"))],
                     tmp_path / "out", o)
    art = result.targets[0].path
    m = verify_files(art)
    assert m.teacher["source"]["format"] == ("torch.export program" if kind == "pt2" else "state_dict")
    if kind == "pt2":  # quantized as it is: no pruning, no training
        assert m.student["pruning"]["macs_ratio"] == 1.0 and m.distillation["history"] == []
        assert m.metrics["values"]["top1_agreement"] == 1.0  # fp32 export of the program itself
    else:
        assert m.student["pruning"]["student_macs"] <= 0.5 * m.student["pruning"]["teacher_macs"]
    x = torch.rand(3, 3, 64, 64)
    session = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    if kind == "pt2":  # the artifact takes [0, 1] pixels and normalizes them as --normalize said
        with torch.no_grad():
            expected = user_weights["model"]((x - 0.5) / 0.25).numpy()
        np.testing.assert_allclose(session.run(None, {"pixels": x.numpy()})[0], expected, atol=1e-4)
    # bench rebuilds the teacher as the manifest records it (file, --arch, its kwargs, the normalization) and
    # measures the artifact against it and the peer's plain int8 on the held-out views, at batch 1 and 8
    bench = runner.invoke(app, ["bench", str(art), "--min-time", "0.05", "--rounds", "1", "--json", str(tmp_path / "b.json"),
                                "--html", str(tmp_path / "b.html")])
    assert bench.exit_code == 0, bench.output
    assert "top1_agreement" in bench.output and "<img" in (tmp_path / "b.html").read_text()
    b = json.loads((tmp_path / "b.json").read_text())
    rows = {r["role"]: r for r in b["results"]}
    assert {"teacher", "peer", "artifact"} <= set(rows) and b["teacher"]["sha256"] == m.teacher["sha256"]
    ours = rows["artifact"]
    assert set(ours["ratio_to_teacher"]) == {"b1_s64_t1", "b8_s64_t1"} and all(v > 0 for v in ours["ratio_to_teacher"].values())
    assert ours["accuracy"]["top1_agreement"] == pytest.approx(m.metrics["values"]["top1_agreement"], abs=1e-6)
    assert ours["accuracy"]["top1_agreement_low95"] <= ours["accuracy"]["top1_agreement"]
    assert ours["peak_rss_mb"] > ours["rss_growth_mb"] > 0  # a fresh process per model: imports, session, 20 runs
    assert any(r["name"].startswith("peer: teacher + plain onnxruntime int8") for r in b["results"])
    refused = runner.invoke(app, ["bench", str(art), "--data", str(photos)])
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.output


@pytest.mark.parametrize("case", ["unsafe-pickle", "no-arch", "bad-import", "mismatch", "arch-for-builtin",
                                  "static-batch", "bad-kwargs", "prune-program", "factory-raises", "markup-in-name"])
def test_bad_user_models_one_line_exit_2(case, user_weights, photos, tmp_path):
    args = ["compile", "--data", str(photos), "--out", str(tmp_path / "out"),
            "--target", str(profile(tmp_path / "p.yaml", "{recipe: fp32}")), "--image-size", "64"]
    if case == "unsafe-pickle":
        bad = tmp_path / "model.pth"
        torch.save(user_weights["model"], bad)  # the whole module: loading it needs arbitrary unpickling
        args += [str(bad), "--arch", "usermodels:build"]
        expected = "needs unpickling arbitrary Python objects, which edgedistill refuses"
    elif case == "no-arch":
        args += [str(user_weights["pt"])]
        expected = "is a file of weights, not a model: it needs the architecture"
    elif case == "bad-import":
        args += [str(user_weights["pt"]), "--arch", "no_such_pkg.models:build"]
        expected = "cannot import no_such_pkg.models"
    elif case == "mismatch":
        args += [str(user_weights["pt"]), "--arch", "usermodels:build", "--arch-kwargs", '{"num_classes": 7}']
        expected = "does not fit --arch usermodels:build: shape (2): classifier.1.weight (10, 1280) vs (7, 1280)"
    elif case == "arch-for-builtin":
        args = [a for a in args if a not in ("--image-size", "64")] + ["mobilenetv2", "--arch", "usermodels:build"]
        expected = "--arch is for your own image classifier (a .pt2 program, or a .safetensors / .pt / .pth state dict), not for mobilenetv2"
    elif case == "static-batch":
        fixed = tmp_path / "fixed.pt2"
        torch.export.save(torch.export.export(user_weights["model"], (torch.rand(1, 3, 64, 64),)), str(fixed))
        args += [str(fixed)]
        expected = "was exported for one batch size only"
    elif case == "bad-kwargs":
        args += [str(user_weights["pt"]), "--arch", "usermodels:build", "--arch-kwargs", "[1, 2]"]
        expected = "--arch-kwargs must be a JSON object"
    elif case == "factory-raises":  # the user's code fails: one line, whatever it raises
        args += [str(user_weights["pt"]), "--arch", "usermodels:broken"]
        expected = "--arch usermodels:broken raised ValueError while building the model: no such width"
    elif case == "markup-in-name":  # a name is printed as typed: not read as rich markup or an emoji code
        odd = tmp_path / "[red]x:factory:.pt"
        odd.write_bytes(user_weights["pt"].read_bytes())
        args += [str(odd)]
        expected = "[red]x:factory:.pt is a file of weights, not a model"
    else:
        args += [str(user_weights["pt2"]), "--macs-ratio", "0.5"]
        expected = "a torch.export program (.pt2) has no module structure to prune"
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert expected in " ".join(res.stderr.split()) and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "out" / "tiny-vision").exists()


def test_executorch_target_ships_a_static_int8_pte_validated_in_the_executorch_runtime(tiny_teacher, photos, tmp_path):
    path = tmp_path / "et.yaml"
    path.write_text("""name: tiny-et
runtime: executorch
execution_provider: XNNPACK
arch: arm64
model_format: pte
fixed_shape: true
threads: 1
quantization: {recipe: fp32}
vision:
  quantization: {recipe: xnnpack-static-int8, per_channel: true, calibration_texts: 8}
  budget: {min_top1_agreement: 0.0}
""")
    result = compile(tiny_teacher, str(photos), [str(path)], tmp_path / "out", opts())
    art = result.targets[0].path
    m = verify_files(art)
    assert m.model["file"] == "model.pte" and m.model["input_shape"] == [1, 3, 64, 64]
    # the teacher's shape, untrained: its weights rounded by GPTQ through the static int8 simulation (XNNPACK's grid is
    # onnxruntime's shifted by 128)
    assert m.distillation["quantization_aware"] is None and m.distillation["history"] == []
    assert m.quantization["weight_rounding"]["method"].startswith("gptq"), m.quantization["weight_rounding"]
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(art / "model.pte")).load_method("forward")
    views = np.load(art / "validation-views.npy")
    logits = np.concatenate([method.execute([torch.from_numpy(v[None].astype(np.float32) / 255.0)])[0].numpy()
                             for v in views])
    agree = float((logits.argmax(-1) == np.load(art / "validation-teacher.npy").argmax(-1)).mean())
    assert agree == pytest.approx(m.metrics["values"]["top1_agreement"], abs=1e-6)
    with torch.no_grad():  # int8: near the float student, not equal to it
        floating = result.student(torch.from_numpy(views[:8]).float() / 255.0).numpy()
    assert 0 < np.abs(logits[:8] - floating).max() < 0.5 * np.abs(floating).max() + 1e-6
    verified = runner.invoke(app, ["verify", str(art)])
    assert verified.exit_code == 0, verified.output


def gpu_profile(name: str, path: Path) -> Path:
    """The built-in GPU profile `name` with a budget of 0 and a small calibration (the tiny teacher's views)."""
    import yaml

    from edgedistill.targets import resolve_target

    spec = resolve_target(name).model_dump(mode="json")
    spec["name"] = f"tiny-{name}"
    spec["vision"]["budget"]["min_top1_agreement"] = 0.0
    if "calibration_texts" in spec["vision"]["quantization"]:
        spec["vision"]["quantization"].update(calibration_texts=8, search=False)
    path.write_text(yaml.safe_dump(spec))
    return path


HAS_GPU = {p: p in ort.get_available_providers() for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")}


@pytest.mark.parametrize("name", ["nvidia-gpu-fp16", "nvidia-tensorrt-int8"])
def test_gpu_targets_build_a_checked_classifier_and_say_what_was_not_measured(name, tiny_teacher, photos, tmp_path):
    import onnx

    result = compile(tiny_teacher, str(photos), [str(gpu_profile(name, tmp_path / "p.yaml"))], tmp_path / "out", opts())
    target = result.targets[0]
    m = verify_files(target.path)
    provider = m.target["execution_provider"]
    assert m.model["coverage"]["ok"] and m.model["coverage"]["provider"] == provider
    assert {"ai.onnx:Conv", "ai.onnx:Clip"} <= set(m.model["coverage"]["ops"])
    assert m.model["structure"]["onnx_checker"] == "passed" and not m.model["structure"]["contrib_ops"]
    model = onnx.load(str(target.path / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # pixels stay float32
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    init = {i.name: i for i in model.graph.initializer}
    x = np.load(target.path / "validation-views.npy")[:8].astype(np.float32) / 255.0
    got = ort.InferenceSession(str(target.path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
    with torch.no_grad():
        expected = result.student(torch.from_numpy(x)).numpy()
    if name == "nvidia-gpu-fp16":
        assert conv_weights and all(init[w].data_type == onnx.TensorProto.FLOAT16 for w in conv_weights)
        assert not any(n.op_type == "QuantizeLinear" for n in model.graph.node)
        np.testing.assert_allclose(got, expected, atol=2e-2 * max(1.0, float(np.abs(expected).max())))
    else:  # TensorRT's explicit int8: symmetric activations (int8 zero points of 0), the clips kept between QDQ pairs
        zero_points = [init[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
        assert zero_points and all(z.data_type == onnx.TensorProto.INT8 for z in zero_points)
        assert all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)
        assert any(n.op_type == "Clip" for n in model.graph.node)
        assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.5
    if not HAS_GPU[provider]:
        assert "CPUExecutionProvider" in m.model["validated_with"]
        assert m.latency["not_measured"].startswith("no CUDA device") and m.latency["batch"] == 8
        report = (target.path / "report.md").read_text()
        assert "latency was not measured" in report and "operator coverage" in report
    else:
        assert "validated_with" not in m.model and m.latency["artifact"]["p50_ms"] > 0
        assert m.latency["teacher_device"] == "cuda"
    verified = runner.invoke(app, ["verify", str(target.path)])
    assert verified.exit_code == 0, verified.output


@pytest.mark.skipif(not HAS_GPU["CUDAExecutionProvider"],
                    reason="no CUDA device: CUDAExecutionProvider is not in this onnxruntime build (CI has no GPU)")
def test_fp16_classifier_is_validated_and_timed_on_the_gpu(tiny_teacher, photos, tmp_path):
    result = compile(tiny_teacher, str(photos), [str(gpu_profile("nvidia-gpu-fp16", tmp_path / "p.yaml"))],
                     tmp_path / "out", opts())
    m = result.targets[0].manifest
    assert "not_measured" not in m.latency and m.latency["teacher_device"] == "cuda"
    assert m.metrics["values"]["top1_agreement"] >= m.metrics["values"]["torch_student_top1_agreement"] - 0.05


def test_fresh_views_are_new_crops_labelled_by_the_teacher_in_the_loop(tiny_teacher, photos, tmp_path, monkeypatch):
    """--fresh-views: every step's crops are drawn anew (none is a cached training view) and the teacher labels
    them in the loop; with --mixup the teacher sees the mixed images; the student caches apart from the cached-view
    one; labelled data refuses --mixup in one line."""
    seen: list[np.ndarray] = []
    real = vision_training.FreshViews.batch

    def spy(self, idx, device="cpu"):
        x, logits = real(self, idx, device)
        seen.append(x.numpy())
        with torch.no_grad():
            np.testing.assert_allclose(logits.numpy(), self.teacher(x).numpy(), atol=1e-5)  # the teacher's, on x
        return x, logits

    monkeypatch.setattr(vision_training.FreshViews, "batch", spy)
    spec = str(profile(tmp_path / "p.yaml", "{recipe: fp32}"))
    result = compile(tiny_teacher, str(photos), [spec], tmp_path / "out", opts(fresh_views=True, macs_ratio=0.5))
    assert len(seen) == 3  # 48 views / 16 per batch, 1 epoch
    cached = {v.tobytes() for v in result.distilled.train_views}
    drawn = np.concatenate(seen)
    assert drawn.shape == (48, 3, 64, 64) and not any(np.round(v * 255).astype(np.uint8).tobytes() in cached for v in drawn)
    assert verify_files(result.targets[0].path)
    fresh = vision_training.FreshViews(result.distilled.data.images, np.zeros(48, int), 64, 0.25,
                                     result.distilled.teacher.module)
    torch.manual_seed(1)
    plain, _ = real(fresh, np.arange(4))
    fresh.mixup_alpha = 0.4
    torch.manual_seed(1)
    mixed, _ = real(fresh, np.arange(4))  # the same crops, mixed in pairs
    assert mixed.shape == plain.shape and not torch.allclose(mixed, plain)
    seen.clear()
    compile(tiny_teacher, str(photos), [spec], tmp_path / "out2", opts(macs_ratio=0.5))  # cached views: another student
    assert not seen
    labelled = tmp_path / "labelled.npz"
    np.savez(labelled, images=np.load(photos)["images"], labels=np.arange(12) % 3)
    res = runner.invoke(app, ["compile", tiny_teacher, "--data", str(labelled), "--target", spec, "--out",
                              str(tmp_path / "out3"), "--fresh-views", "--mixup", "0.2"])
    assert res.exit_code == 2 and "a mixed image has no single label" in res.stderr, res.output


def test_fresh_views_resume_after_an_interruption_as_if_uninterrupted(tiny_teacher, photos, tmp_path, monkeypatch):
    """The crops are seeded from torch's RNG, which a checkpoint saves and a resumed run restores: a run stopped
    after its first checkpoint and resumed trains on the same crops and ends with the same history and student."""
    spec = str(profile(tmp_path / "p.yaml", "{recipe: fp32}"))
    three_epochs = dict(distill=DistillConfig(epochs=3, batch_size=16), fresh_views=True, checkpoint_every=2,
                        macs_ratio=0.5)
    ref = compile(tiny_teacher, str(photos), [spec], tmp_path / "ref", CompileOptions(cache_dir=tmp_path / "c1",
                                                                                       **three_epochs))
    real, calls = vision_training.FreshViews.batch, [0]

    def stop_at_the_fifth(self, idx, device="cpu"):
        calls[0] += 1
        if calls[0] == 5:  # after the checkpoint at step 4
            raise KeyboardInterrupt
        return real(self, idx, device)

    monkeypatch.setattr(vision_training.FreshViews, "batch", stop_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        compile(tiny_teacher, str(photos), [spec], tmp_path / "out", CompileOptions(cache_dir=tmp_path / "c2", **three_epochs))
    after: list[int] = []

    def count(self, idx, device="cpu"):
        after.append(1)
        return real(self, idx, device)

    monkeypatch.setattr(vision_training.FreshViews, "batch", count)
    resumed = compile(tiny_teacher, str(photos), [spec], tmp_path / "out",
                      CompileOptions(cache_dir=tmp_path / "c2", resume=True, **three_epochs))
    # (step 0's train loss is NaN: no step taken yet)
    np.testing.assert_array_equal(np.array(resumed.distilled.trained.history), np.array(ref.distilled.trained.history))
    assert len(ref.distilled.trained.history) > 1
    assert len(after) == 9 - 4  # it went on from the checkpoint at step 4 of 9, not from the start
    for a, b in zip(resumed.student.state_dict().values(), ref.student.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_search_works_for_image_classifiers_too(tiny_teacher, photos, tmp_path):
    """The family's shapes (shares of the MACs) go through the same successive halving as an encoder's."""
    out = tmp_path / "out"
    res = runner.invoke(app, ["compile", tiny_teacher, "--data", str(photos), "--out", str(out), "--epochs", "2",
                              "--batch-size", "16", "--target", str(profile(tmp_path / "p.yaml", "{recipe: fp32}")),
                              "--search", "--time-budget", "10m"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "tiny-vision" / "manifest.json").read_text())["search"]
    assert [s["shape"]["macs_ratio"] for s in record["shapes"]] == [1.0, 0.7, 0.5, 0.35]
    # the teacher's shape (a plain compile's) runs its whole schedule after the first rung; the other three halve
    assert [sum(e["rung"] == r for e in record["evaluations"]) for r in range(3)] == [4, 2, 2]
    assert record["plain_compile_shape"]["whole_schedule"] and record["plain_compile_shape"]["label"].startswith("100%")
    assert "--macs-ratio and --search" in " ".join(runner.invoke(app, [
        "compile", tiny_teacher, "--data", str(photos), "--out", str(tmp_path / "o2"), "--search", "--macs-ratio", "0.5",
        "--target", str(profile(tmp_path / "p.yaml", "{recipe: fp32}"))]).output.split())


def test_int8_weights_are_rounded_by_gptq_unless_the_student_trained_through_nearest(tiny_teacher, photos, tmp_path):
    """Without quantization-aware distillation the static int8 artifact's weights are those GPTQ chose (cached and
    reused by the next compile); a quantization-aware student and `weight_rounding: nearest` keep nearest rounding."""
    import onnx
    from onnx import numpy_helper

    cache = tmp_path / "cache"
    first = compile(tiny_teacher, str(photos), [str(profile(tmp_path / "p.yaml", QAT_INT8))], tmp_path / "o1",
                    opts(quantization_aware=False, cache_dir=cache))
    m = verify_files(first.targets[0].path)
    r = m.quantization["weight_rounding"]
    assert r["method"].startswith("gptq") and r["layers"] == 53 and r["views"] == 48 and "cached" not in r
    assert "weights rounded by GPTQ with bias correction" in (first.targets[0].path / "report.md").read_text()
    # the artifact's int8 weights land exactly on the rounded student's (cached): the quantizer rounded nothing
    again = compile(tiny_teacher, str(photos), [str(profile(tmp_path / "p.yaml", QAT_INT8))], tmp_path / "o2",
                    opts(quantization_aware=False, cache_dir=cache))
    assert verify_files(again.targets[0].path).quantization["weight_rounding"]["cached"] is True
    (directory,) = (cache / "rounded").iterdir()
    from safetensors.torch import load_file

    rounded = sorted((v.numpy() for k, v in load_file(str(directory / "student.safetensors")).items()
                      if k.endswith("weight") and v.ndim in (2, 4)), key=lambda w: (w.shape, float(np.abs(w).sum())))
    graph = onnx.load(str(first.targets[0].path / "model.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    stored = sorted((inits[n.input[0]].astype(np.float32) * inits[n.input[1]].reshape(-1, *[1] * (inits[n.input[0]].ndim - 1))
                     for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                     and inits[n.input[0]].dtype == np.int8), key=lambda w: (w.shape, float(np.abs(w).sum())))
    assert len(stored) == len(rounded) == 53
    for ours, theirs in zip(rounded, stored):
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-6 * float(np.abs(ours).max()))
    qat = compile(tiny_teacher, str(photos), [str(profile(tmp_path / "p.yaml", QAT_INT8))], tmp_path / "o3",
                  opts(quantization_aware=True))
    assert verify_files(qat.targets[0].path).quantization["weight_rounding"] == {
        "method": "nearest (the quantizer's)", "why": "the student was distilled through nearest rounding"}
    nearest = tmp_path / "n.yaml"
    profile(nearest, QAT_INT8)
    nearest.write_text(nearest.read_text() + "  weight_rounding: nearest\n")
    plain = compile(tiny_teacher, str(photos), [str(nearest)], tmp_path / "o4", opts(quantization_aware=False))
    assert verify_files(plain.targets[0].path).quantization["weight_rounding"] == {"method": "nearest (the quantizer's)"}


def test_the_search_scores_an_untrained_student_on_training_views_calibration_and_gptq_never_used():
    """The teacher's own shape never trains, so training views are unseen to it: the search scores it on views of all
    the training photos (not on the held-out photos the verdict is read on) and never on the calibration's or GPTQ's
    views; a trained student, which fitted its training views, is scored on the first held-out views."""
    import types

    from edgedistill.families.vision_stages import SEARCH_TRAIN_VIEWS, SEARCH_VIEWS, calibration_views, search_set

    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (1000, 3, 4, 4), dtype=np.uint8)
    val = rng.integers(0, 256, (300, 3, 4, 4), dtype=np.uint8)
    d = types.SimpleNamespace(trained=types.SimpleNamespace(history=[]), pruning={"not_distilled": "the teacher"},
                              train_views=train, train_logits=np.arange(1000.0)[:, None], val_views=val,
                              val_logits=np.arange(300.0)[:, None], num_train_images=40)
    views, logits, what = search_set(d, (64, 128))
    assert len(views) == SEARCH_TRAIN_VIEWS and "training views of the 40 training images" in what
    index = logits[:, 0].astype(int)  # the logits are the training view's own index
    np.testing.assert_array_equal(views, train[index])
    reserved = {v.tobytes() for n in (64, 128) for v in calibration_views(train, n)}
    assert not any(v.tobytes() in reserved for v in views) and len(set(index)) == len(index)
    assert index.min() < 20 and index.max() > 980  # spread over the whole set, so over every photo
    d.trained.history = [(0, 0.5, None)]  # trained: the held-out views
    views, logits, what = search_set(d, (64, 128))
    np.testing.assert_array_equal(views, val[:SEARCH_VIEWS])
    assert what == f"the first {SEARCH_VIEWS} held-out views"
    d.trained.history, d.train_views = [], train[:200]  # too few training views left: the held-out views
    assert "too few training views" in search_set(d, (64, 128))[2]


def test_bench_quantizes_the_teacher_with_the_artifacts_weight_storage(tmp_path):
    """The bench's "teacher + our int8 recipe" row stores weights as the artifact's profile does (7-bit for
    x86-64-avx2); the peer's plain int8 keeps onnxruntime's 8-bit default."""
    import types

    import onnx
    from onnx import numpy_helper

    from edgedistill.bench.vision import peer_models

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU6(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    views = np.random.default_rng(0).integers(0, 256, (8, 3, 16, 16), dtype=np.uint8)
    models = peer_models(types.SimpleNamespace(module=net), 16, tmp_path, views, {"reduce_range": True})

    def largest_weight_integer(path):
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        return max(int(np.abs(v.astype(np.int32)).max()) for v in inits.values() if v.dtype == np.int8 and v.ndim > 1)

    assert largest_weight_integer(models["teacher + our int8 recipe (no distillation)"]) == 64
    assert largest_weight_integer(models["peer: teacher + plain onnxruntime int8"]) == 127
