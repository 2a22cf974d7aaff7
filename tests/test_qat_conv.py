"""Quantization-aware simulation for CNNs: BatchNorm folding, per-channel weight rounding as onnxruntime stores it,
activation ranges as its min-max calibrator measures them, Conv+ReLU6 fusion, and removal."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgedistill.distill.qat import float_state_dict
from edgedistill.distill.qat_conv import ConvQuantSim, fake_quant_uint8, fold_batchnorm, round_per_channel
from edgedistill.quantize import quantize
from edgedistill.quantize.configs import StaticQdqInt8Config


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU6(inplace=True), nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        return x + self.body(x)


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
                          Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    for m in model.modules():  # BatchNorm statistics far from identity, so folding is really tested
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g)
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16)
    return (0.6 * base + 0.4 * ramp * torch.rand(n, 3, 16, 1, generator=g)).clamp(0, 1)


def test_fold_batchnorm_keeps_the_function_and_removes_every_batchnorm():
    model, x = tiny_cnn(), images(4)
    with torch.no_grad():
        before = model(x)
    assert fold_batchnorm(model, x[:1]) == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)


def test_fold_batchnorm_into_tf_same_padded_convolutions():
    """EfficientNet-Lite's Conv2dSame pads itself at stride 2 and calls conv2d directly: the bias a folded BatchNorm
    adds must reach that call (it was dropped, and the compile of efficientnet-lite0 at its defaults failed)."""
    from edgedistill.teachers.vision_archs import efficientnet_lite0

    torch.manual_seed(0)
    model = efficientnet_lite0(num_classes=5, stage_blocks=(1,) * 7).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.3, 0.3)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    assert fold_batchnorm(model, x[:1]) == sum(1 for m in efficientnet_lite0(stage_blocks=(1,) * 7).modules()
                                               if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-4 * float(before.abs().max()))


def test_round_per_channel_is_symmetric_int8_per_output_channel():
    w = torch.randn(4, 3, 3, 3) * torch.tensor([0.01, 1.0, 5.0, 0.0]).view(4, 1, 1, 1)
    q = round_per_channel(w)
    for c in range(3):
        scale = w[c].abs().max() / 127
        steps = q[c] / scale
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 127 + 1e-3
        assert (q[c] - w[c]).abs().max() <= scale / 2 + 1e-6
    assert torch.equal(q[3], w[3])  # an all-zero channel stays zero (no division by zero)


def test_fake_quant_uint8_lands_on_the_grid_and_passes_gradients_straight_through():
    x = torch.linspace(-1, 3, 101, requires_grad=True)
    y = fake_quant_uint8(x, -1.0, 3.0)
    scale = 4.0 / 255
    steps = y.detach() / scale  # (q - zero) with integer q and zero point
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert (y.detach() - x.detach()).abs().max() <= scale / 2 + 1e-6
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("reduce_range", [False, True])
def test_simulation_matches_onnxruntime_weights_and_activation_scales(reduce_range, tmp_path):
    model, x = tiny_cnn(), images(16)
    fold_batchnorm(model, x[:1])
    levels = 64 if reduce_range else 127  # 7-bit weights: integers in [-64, 64]
    sim = ConvQuantSim(model, x[:1], weight_levels=levels)
    assert len(sim.clamp) == 2  # the stem and the depthwise Conv each feed only a ReLU6: fused
    sim.calibrate(x)
    sim.remove()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x[:1],), str(path), input_names=["pixels"], output_names=["logits"], opset_version=17,
                      dynamo=False)
    out = tmp_path / "q.onnx"
    quantize(path, StaticQdqInt8Config(op_types=["Conv", "Gemm", "Clip"], calibration_texts=16, search=False,
                                       reduce_range=reduce_range), out,
             [{"pixels": v[None].numpy()} for v in x])
    graph = onnx.load(str(out)).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    act_scales = np.unique([float(init[n.input[1]]) for n in graph.node
                            if n.op_type == "QuantizeLinear" and n.input[0] not in init])
    sim_scales = np.unique([(max(hi, 0.0) - min(lo, 0.0)) / 255 for lo, hi in sim.ranges.values()])
    sim_scales = sim_scales[np.concatenate([[True], np.diff(sim_scales) > 1e-6 * sim_scales[1:]])]  # the same tensor
    np.testing.assert_allclose(act_scales, sim_scales, rtol=1e-5)
    producer = {o: n for n in graph.node for o in n.output}
    conv_weights = [n.input[1] for n in graph.node if n.op_type in ("Conv", "Gemm")]
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name, layer in zip(conv_weights, layers):
        dq = producer[name]
        q, s = init[dq.input[0]].astype(np.float32), init[dq.input[1]]
        ort_w = q * s.reshape(-1, *([1] * (q.ndim - 1)))
        np.testing.assert_allclose(ort_w, round_per_channel(layer.weight.detach(), levels).numpy(), atol=1e-7)
    with torch.no_grad():  # the simulation's weights are those too
        sim = ConvQuantSim(model, x[:1], weight_levels=levels)
        for layer in sim.layers:
            assert torch.equal(layer.weight, round_per_channel(layer.parametrizations.weight.original, levels))
        sim.remove()


def test_rounding_switches_off_and_removal_leaves_float_weights_under_plain_names():
    model, x = tiny_cnn(), images(8)
    fold_batchnorm(model, x[:1])
    with torch.no_grad():
        float_out = model(x)
    sim = ConvQuantSim(model, x[:1])
    sim.calibrate(x)
    with torch.no_grad():
        rounded = model(x)
        with sim.rounding(False):
            assert torch.allclose(model(x), float_out, atol=1e-6)
    assert not torch.allclose(rounded, float_out, atol=1e-4)
    state = float_state_dict(model)
    assert not any("parametrizations" in k for k in state)
    sim.remove()
    with torch.no_grad():
        assert torch.allclose(model(x), float_out, atol=1e-6)
    assert set(state) == set(model.state_dict())


def test_gradients_reach_the_float_weights_through_the_rounding():
    model, x = tiny_cnn(), images(8)
    fold_batchnorm(model, x[:1])
    sim = ConvQuantSim(model, x[:1])
    sim.calibrate(x)
    model.train()
    model(x).sum().backward()
    first = sim.layers[0]
    grad = first.parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum() > 0
    sim.remove()


def test_folding_refuses_when_the_fold_would_change_the_function():
    class Shared(nn.Module):  # the conv output is used by BatchNorm and, functionally, by the residual add
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
            self.bn.running_mean.fill_(0.5)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model, x = Shared().eval(), images(1)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(RuntimeError, match="folding BatchNorm changed the output"):
        fold_batchnorm(model, x)
    assert isinstance(model.bn, nn.BatchNorm2d)  # undone: the model is as it was
    with torch.no_grad():
        assert torch.equal(model(x), before)
