"""Vision end to end on a tiny MobileNetV2 teacher (width 0.25, 10 classes, 64x64): the pruned, distilled student's
artifact loads in onnxruntime, matches the torch student, is int8 where the profile says, verifies; bad options and
targets without a vision section get one line and exit 2."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from edgedistill.artifact import verify_files
from edgedistill.cli import app
from edgedistill.distill.loop import DistillConfig
from edgedistill.families import vision_stages
from edgedistill.pipeline import CompileOptions, compile
from edgedistill.teachers import vision
from edgedistill.teachers.vision_archs import mobilenet_v2

runner = CliRunner()


@pytest.fixture
def tiny_teacher(tmp_path, monkeypatch) -> str:
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10, width_mult=0.25)
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
                     opts(macs_ratio=0.5))
    target = result.targets[0]
    assert target.published
    m = verify_files(target.path)
    assert m.family == "vision" and m.model["inputs"] == ["pixels"]
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


def test_int8_artifact_is_quantized_and_its_trials_recorded(tiny_teacher, photos, tmp_path):
    q = "{recipe: static-qdq-int8, op_types: [Conv, Gemm], calibration_texts: 8, search: false}"
    result = compile(tiny_teacher, str(photos), [str(profile(tmp_path / "p.yaml", q))], tmp_path / "out", opts())
    m = verify_files(result.targets[0].path)
    ops = m.quantization["operators"]
    assert ops.get("QuantizeLinear", 0) > 10 and ops.get("DequantizeLinear", 0) > 10, ops
    assert m.quantization["trials"][0]["description"] == "as the profile says"
    assert m.sizes["model_mb"] < 0.5 * m.sizes["teacher_weights_mb"]
    assert 0.0 <= m.metrics["values"]["top1_agreement"] <= 1.0


@pytest.mark.parametrize("case", ["lm-option", "no-vision-section", "macs-ratio"])
def test_bad_vision_input_one_line_exit_2(case, tiny_teacher, photos, tmp_path):
    args = ["compile", tiny_teacher, "--data", str(photos), "--out", str(tmp_path / "out")]
    if case == "lm-option":
        args += ["--target", str(profile(tmp_path / "p.yaml", "{recipe: fp32}")), "--student-layers", "2"]
        expected = "--student-layers does not apply to image classifiers"
    elif case == "no-vision-section":
        (tmp_path / "p.yaml").write_text("name: textonly\nthreads: 1\nquantization: {recipe: fp32}\n")
        args += ["--target", str(tmp_path / "p.yaml")]
        expected = "has no vision section"
    else:
        args += ["--target", str(profile(tmp_path / "p.yaml", "{recipe: fp32}")), "--macs-ratio", "1.5"]
        expected = "--macs-ratio 1.5 is out of range"
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert expected in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "out" / "tiny-vision").exists()


def test_photos_are_held_out_whole_when_there_are_enough():
    train, val, held_out = vision_stages.split_images(60, 0.05, 0)
    assert held_out and len(val) == 3 and not set(train) & set(val) and len(train) + len(val) == 60
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
    code = re.search(r"```python\n(import numpy as np, onnxruntime as ort\nfrom PIL import Image\n\nart, photo.*?)```",
                     readme, re.S).group(1)
    code = code.replace('"build/vision/x86-64-avx512", "photo.jpg"', f'"{art}", "{tmp_path / "photo.png"}"')
    code = code.replace("256", "73").replace("224", "64")  # the tiny teacher's resize / crop
    scope: dict = {}
    exec(compile_code(code), scope)  # noqa: S102 (our own README)
    view, _ = make_views([image], 1, 64, 0, train=False)
    session = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"pixels": view.astype(np.float32) / 255.0})[0][0]
    np.testing.assert_allclose(scope["logits"], expected, atol=1e-5)


def compile_code(code: str):
    import builtins

    return builtins.compile(code, "README.md", "exec")
