"""ImageNet CNNs in the exact module layout of their published weights: MobileNetV2 as torchvision lays it out
(`features.N...`, `classifier.1`) and EfficientNet-Lite0 as lukemelas/efficientnet_pytorch does (`_conv_stem`,
`_blocks.N._expand_conv`, ..., `_fc`). Plain torch, so neither torchvision nor timm is needed. Both take per-stage
block counts, so a student can be the same network with fewer repeated blocks."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

# (expansion t, output channels c, blocks n, stride s) per stage, from the MobileNetV2 paper (Table 2)
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1))
# (expansion, output channels, blocks, stride, kernel) per stage, from TF's efficientnet_lite_builder (lite0)
EFFICIENTNET_LITE0_STAGES = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
                             (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3))
# TF's BatchNormalization(momentum=0.99, epsilon=1e-3), as efficientnet_pytorch translates it
TF_BN = {"eps": 1e-3, "momentum": 0.01}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Return `value` rounded to a multiple of `divisor`, never more than 10% below it (torchvision's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _stage_blocks(stages: Sequence[tuple], stage_blocks: Sequence[int] | None) -> list[int]:
    if stage_blocks is None:
        return [s[2] for s in stages]
    if len(stage_blocks) != len(stages) or any(n < 1 for n in stage_blocks):
        raise ValueError(f"stage_blocks needs {len(stages)} counts of at least 1, got {list(stage_blocks)}")
    return list(stage_blocks)


def _init_weights(model: nn.Module) -> None:
    """torchvision's MobileNet init; loading a state dict overwrites it."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# --- MobileNetV2 (torchvision layout) ---------------------------------------------------------------------------

class ConvBNReLU6(nn.Sequential):
    """Conv (no bias, symmetric padding) -> BatchNorm -> ReLU6: torchvision's Conv2dNormActivation."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped when t=1), 3x3 depthwise, 1x1 linear projection, residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(cin * expand_ratio)
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU6(cin, hidden, 1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with torchvision's module names, so its IMAGENET1K_V1 state dict loads strictly."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, stage_blocks: Sequence[int] | None = None,
                 dropout: float = 0.2) -> None:
        super().__init__()
        cin = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(3, cin, stride=2)]
        for (t, c, _, s), n in zip(MOBILENET_V2_STAGES, _stage_blocks(MOBILENET_V2_STAGES, stage_blocks)):
            cout = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNReLU6(cin, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, stage_blocks: Sequence[int] | None = None,
                 dropout: float = 0.2) -> MobileNetV2:
    """Return a MobileNetV2; the defaults are torchvision's `mobilenet_v2()` (7 stages of 1,2,3,4,3,3,1 blocks)."""
    return MobileNetV2(num_classes, width_mult, stage_blocks, dropout)


# --- EfficientNet-Lite0 (lukemelas/efficientnet_pytorch layout) -------------------------------------------------

class Conv2dSame(nn.Conv2d):
    """Conv2d (no bias) with TensorFlow's 'SAME' padding, which the Lite weights were trained with. At stride 1
    (odd kernels) that is symmetric padding; at stride 2 on an even size it puts the extra row and column at the
    bottom/right, where symmetric padding would shift the sampling grid by a pixel."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        if kernel % 2 == 0 or kernel < stride:
            raise ValueError(f"Conv2dSame needs an odd kernel at least as large as its stride, got k={kernel} s={stride}")
        super().__init__(cin, cout, kernel, stride, (kernel - 1) // 2 if stride == 1 else 0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            return super().forward(x)
        # Python ints, so an exported graph pads by constants (onnxruntime then folds the Pad into the Conv's pads;
        # traced from the shape, the Pad ran in float between a DequantizeLinear and a QuantizeLinear): the exported
        # input size is fixed, only the batch is free
        (ih, iw), k, s = (int(d) for d in x.shape[-2:]), self.kernel_size[0], self.stride[0]
        pad_h, pad_w = (-(-ih // s) - 1) * s + k - ih, (-(-iw // s) - 1) * s + k - iw  # >= 0 since k >= s
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)  # a folded BN adds one


class MBConvBlock(nn.Module):
    """EfficientNet-Lite MBConv: 1x1 expand (skipped when e=1), kxk depthwise, 1x1 projection; ReLU6, no
    squeeze-excite; residual if shapes match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = Conv2dSame(cin, hidden, 1)
            self._bn0 = nn.BatchNorm2d(hidden, **TF_BN)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride, hidden)
        self._bn1 = nn.BatchNorm2d(hidden, **TF_BN)
        self._project_conv = Conv2dSame(hidden, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, **TF_BN)
        self._swish = nn.ReLU6()  # efficientnet_pytorch's name for the activation, kept for its module tree
        self.use_residual = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self._swish(self._bn0(self._expand_conv(inputs))) if hasattr(self, "_expand_conv") else inputs
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.use_residual else x  # the training-time drop-connect is left out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with efficientnet_pytorch's module names; stem (32) and head (1280) are not scaled."""

    def __init__(self, stages: Sequence[tuple] = EFFICIENTNET_LITE0_STAGES, num_classes: int = 1000,
                 stage_blocks: Sequence[int] | None = None, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, **TF_BN)
        blocks, cin = [], 32
        for (e, c, _, s, k), n in zip(stages, _stage_blocks(stages, stage_blocks)):
            for i in range(n):
                blocks.append(MBConvBlock(cin, c, k, s if i == 0 else 1, e))
                cin = c
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(cin, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, **TF_BN)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        self._swish = nn.ReLU6()
        _init_weights(self)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the head's activations (N, 1280, H/32, W/32)."""
        x = self._swish(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._swish(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self._avg_pooling(self.extract_features(x)), 1)
        return self._fc(self._dropout(x))


def efficientnet_lite0(num_classes: int = 1000, stage_blocks: Sequence[int] | None = None,
                       dropout: float = 0.2) -> EfficientNetLite:
    """Return an EfficientNet-Lite0 (7 stages of 1,2,2,3,3,4,1 blocks by default)."""
    return EfficientNetLite(EFFICIENTNET_LITE0_STAGES, num_classes, stage_blocks, dropout)
