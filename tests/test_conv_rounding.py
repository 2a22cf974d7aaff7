"""Calibrated int8 weight rounding (GPTQ + bias correction) of a small CNN: the weights land on the grid the quantizer
stores, onnxruntime stores exactly those integers, and the int8 model's error against float falls."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from edgedistill.distill.qat_conv import ConvQuantSim, fold_batchnorm, round_per_channel
from edgedistill.quantize.conv_rounding import round_weights


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),  # depthwise: one H per channel
        nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24),
        nn.Conv2d(24, 32, 3, padding="same"), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    with torch.no_grad():  # trained-looking BatchNorm statistics, so the folded weights have uneven channel ranges
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.05, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return net


def _images(n: int, seed: int) -> torch.Tensor:
    """Smooth, structured images (blurred noise plus gradients), not white noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x = nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    ramp = torch.linspace(0, 1, 32)
    return (0.7 * x + 0.3 * ramp[None, None, :, None] * torch.rand(n, 3, 1, 1, generator=g)).clamp(0, 1)


def _round(levels: int):
    net = _net()
    example = _images(2, 99)
    fold_batchnorm(net, example)
    calibration, views = _images(16, 1), _images(64, 2)
    model = copy.deepcopy(net)
    record = round_weights(model, example, calibration, views, levels=levels)
    return net, model, record, calibration


@pytest.fixture(scope="module")
def rounded():
    return _round(127)


@pytest.fixture(scope="module")
def rounded_7bit():
    """Rounded onto onnxruntime's 7-bit weight grid (`reduce_range`: integers in [-64, 64], scale max |w| / 64)."""
    return _round(64)


@pytest.mark.parametrize("which, levels", [("rounded", 127), ("rounded_7bit", 64)])
def test_weights_land_on_the_per_channel_int8_grid_with_the_same_scales(which, levels, request):
    net, model, record, _ = request.getfixturevalue(which)
    assert record["layers"] == 5 and record["views"] == 64 and record["weight_levels"] == levels
    for before, after in zip([m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))],
                             [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]):
        w, w0 = after.weight.detach(), before.weight.detach()
        flat, flat0 = w.reshape(len(w), -1), w0.reshape(len(w0), -1)
        # the largest |w| of each channel is kept, so the quantizer computes the same scale
        assert torch.equal(flat.abs().amax(1), flat0.abs().amax(1))
        assert torch.allclose(round_per_channel(w, levels), w, rtol=0, atol=1e-6 * float(w.abs().max()))
        assert not torch.equal(round_per_channel(w0, levels), w)  # not plain nearest rounding
        assert not torch.equal(after.bias, before.bias)  # the bias was corrected


@pytest.mark.parametrize("which, reduce_range", [("rounded", False), ("rounded_7bit", True)])
def test_onnxruntime_stores_exactly_the_rounded_weights(which, reduce_range, request, tmp_path):
    import onnx
    from onnx import numpy_helper

    from edgedistill.quantize import quantize
    from edgedistill.quantize.configs import StaticQdqInt8Config, int8_weight_levels

    _, model, _, calibration = request.getfixturevalue(which)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (calibration[:1],), str(path), input_names=["pixels"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    cfg = StaticQdqInt8Config(op_types=["Conv", "Gemm", "Clip"], calibration_texts=16, reduce_range=reduce_range)
    q = quantize(path, cfg, tmp_path / "q.onnx", [{"pixels": x[None].numpy()} for x in calibration])
    graph = onnx.load(str(q)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    stored = []
    for node in graph.node:  # weights: int8 initializer -> DequantizeLinear (per-channel scale)
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].dtype == np.int8:
            ints, scale = inits[node.input[0]].astype(np.float32), inits[node.input[1]]
            # every channel reaches the grid's end and none passes it: 127, or 64 with 7-bit weights
            assert np.abs(ints).reshape(len(ints), -1).max(1).tolist() == [int8_weight_levels(cfg)] * len(ints)
            stored.append(ints * scale.reshape(-1, *[1] * (ints.ndim - 1)))
    ours = [m.weight.detach().numpy() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(stored) == len(ours)
    for w in ours:
        match = [s for s in stored if s.shape == w.shape and np.allclose(s, w, rtol=0, atol=1e-6 * np.abs(w).max())]
        assert match, f"no stored int8 weight equals the rounded {w.shape} weight"


def test_the_simulated_int8_model_is_closer_to_float_than_with_nearest_rounding(rounded):
    net, model, _, calibration = rounded
    held_out = _images(64, 3)
    with torch.no_grad():
        want = net(held_out)
    errors = {}
    for name, m in (("nearest", copy.deepcopy(net)), ("gptq", copy.deepcopy(model))):
        sim = ConvQuantSim(m, held_out[:2])
        sim.calibrate(calibration)
        with torch.no_grad():
            errors[name] = float(((m(held_out) - want) ** 2).mean())
        sim.remove()
    assert errors["gptq"] < 0.6 * errors["nearest"], errors  # measured 1.8e-7 vs 5.7e-7


def test_xnnpack_static_int8_stores_exactly_the_rounded_weights(rounded):
    """XNNPACK's PT2E quantizer (per-channel symmetric, [-127, 127], scale max |w| / 127) lands on the same grid:
    the converted program's int8 weights times their scales are the rounded weights."""
    pytest.importorskip("executorch")
    from edgedistill.backends.executorch import quantize_for_xnnpack

    _, model, _, calibration = rounded
    example = (calibration[:1],)
    program = quantize_for_xnnpack(torch.export.export(model, example), example,
                                   [(x[None],) for x in calibration], per_channel=True, dynamic=False)
    stored = []
    for node in program.graph.nodes:
        if node.op == "call_function" and "dequantize_per_channel" in str(node.target):
            src, scale = node.args[0], node.args[1]
            if src.op == "placeholder" and scale.op == "placeholder":
                ints = _constant(program, src.name).float()
                scales = _constant(program, scale.name).float()
                stored.append((ints * scales.reshape(-1, *[1] * (ints.ndim - 1))).numpy())
    ours = [m.weight.detach().numpy() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(stored) == len(ours), (len(stored), len(ours))
    for w in ours:
        assert any(s.shape == w.shape and np.allclose(s, w, rtol=0, atol=1e-6 * np.abs(w).max()) for s in stored), w.shape


def _constant(program, placeholder: str) -> torch.Tensor:
    """Return the tensor an ExportedProgram's placeholder stands for (a parameter, buffer or lifted constant)."""
    for spec in program.graph_signature.input_specs:
        if spec.arg.name == placeholder:
            return program.state_dict.get(spec.target, program.constants.get(spec.target))
    raise KeyError(placeholder)


def test_unsigned_weights_are_the_same_model_run_by_u8u8_kernels(rounded, tmp_path):
    """`unsigned_weights` stores each int8 weight q as uint8 q + 128 with zero point 128: the same values (the
    unoptimized graphs agree bit for bit), which onnxruntime's fused convolutions then compute without int16
    saturation on CPUs without VNNI."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from edgedistill.quantize import quantize
    from edgedistill.quantize.configs import StaticQdqInt8Config

    _, model, _, calibration = rounded
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (calibration[:1],), str(path), input_names=["pixels"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    feeds = [{"pixels": x[None].numpy()} for x in calibration]
    graphs = {}
    for unsigned in (False, True):
        cfg = StaticQdqInt8Config(op_types=["Conv", "Gemm", "Clip"], calibration_texts=16, unsigned_weights=unsigned)
        graphs[unsigned] = quantize(path, cfg, tmp_path / f"q{int(unsigned)}.onnx", feeds)

    def weights(q):
        graph = onnx.load(str(q)).graph
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        return [(inits[n.input[0]], inits[n.input[2]]) for n in graph.node
                if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim > 1]

    signed, unsigned = weights(graphs[False]), weights(graphs[True])
    assert len(signed) == len(unsigned) == 5
    for (q, z), (u, zu) in zip(signed, unsigned):
        assert q.dtype == np.int8 and not z.any()
        assert u.dtype == np.uint8 and (zu == 128).all() and np.array_equal(u.astype(np.int16) - 128, q)

    def run(q, level):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(q), options, providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {"pixels": x[None]})[0] for x in _images(8, 4).numpy()])

    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    np.testing.assert_array_equal(run(graphs[False], off), run(graphs[True], off))
    fused = run(graphs[True], ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    scale = np.abs(run(graphs[True], off)).max()
    assert np.abs(fused - run(graphs[True], off)).max() < 0.05 * scale
