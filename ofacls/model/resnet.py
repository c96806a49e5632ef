"""OFA's convolutional trunk: the first three stages of a ResNet.

OFA embeds an image as the layer3 feature map of a Bottleneck ResNet (1024
channels, stride 16: 30x30 tokens at 480 px). There is no layer4, pooling or
classifier head, and the block is Bottleneck V1.5 (stride on the 3x3) even for
the resnet18/34 names.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def conv_norm_pairs(self) -> list[tuple[nn.Module, str, str]]:
        """(module, name of a convolution in it, name of the BatchNorm after that
        convolution), for this block's convolutions and its downsample branch's."""
        pairs: list[tuple[nn.Module, str, str]] = [(self, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
        if self.downsample is not None:
            pairs.append((self.downsample, "0", "1"))
        return pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNetTrunk(nn.Module):
    """Stem + layer1..layer3. (B, 3, S, S) -> (B, 1024, S/16, S/16)."""

    out_channels = 1024

    def __init__(self, layers: tuple[int, int, int]) -> None:
        super().__init__()
        self.channels_last = False
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        stages = []
        for width, depth, stride in zip((64, 128, 256), layers, (1, 2, 2)):
            blocks = []
            for i in range(depth):
                blocks.append(Bottleneck(in_ch, width, stride if i == 0 else 1))
                in_ch = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages

    def use_channels_last(self, on: bool = True) -> None:
        """Run the convolutions in NHWC, oneDNN's and cuDNN's native layout (or,
        `on=False`, in NCHW again).

        NCHW costs a copy of every input in and out of oneDNN's layout: on CPU
        NHWC runs the bf16 trunk ~2x faster and the fp32 one 4-14% (AVX2). The
        reference runs NCHW; NHWC sums in another order, which the fp32
        rounding budget of the parity tests covers."""
        self.channels_last = on
        self.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def fold_batchnorm(self) -> list[torch.Tensor]:
        """Fold each BatchNorm's frozen statistics into the convolution before it.

        In inference a BatchNorm is a per-channel scale and shift, so
        conv(x, w) * s + t = conv(x, w * s) + t: the trunk then makes one pass over
        each feature map where it made two (the ResNet-152 trunk's BatchNorms read
        and write about 0.8 GB per 480 px image). The products are formed in fp64 and
        rounded once, so the folded weights are as close to the exact ones as the
        dtype allows; the parity tests bound the change in scores. Returns the
        convolutions' former weights (the caller may release their pages)."""
        pairs: list[tuple[nn.Module, str, str]] = [(self, "conv1", "bn1")]
        for stage in (self.layer1, self.layer2, self.layer3):
            for block in stage:
                pairs += cast(Bottleneck, block).conv_norm_pairs()
        replaced = []
        for owner, conv_name, bn_name in pairs:
            conv = cast(nn.Conv2d, owner.get_submodule(conv_name))
            bn = cast(nn.BatchNorm2d, owner.get_submodule(bn_name))
            assert bn.running_mean is not None and bn.running_var is not None
            w = conv.weight
            replaced.append(w)
            scale = bn.weight.double() * torch.rsqrt(bn.running_var.double() + bn.eps)
            shift = bn.bias.double() - bn.running_mean.double() * scale
            folded = torch.empty_like(w)
            # a slice of output channels at a time: whole-weight fp64 temporaries (4x
            # the weight) left holes in the heap that the next, larger folded weights
            # did not fit, and some loads kept ~165 MB more resident at OFA-Large
            for lo in range(0, w.shape[0], 64):
                folded[lo:lo + 64] = w[lo:lo + 64].double() * scale[lo:lo + 64].view(-1, 1, 1, 1)
            conv.weight = nn.Parameter(folded, requires_grad=False)
            conv.bias = nn.Parameter(shift.to(w.dtype), requires_grad=False)
            setattr(owner, bn_name, nn.Identity())
        return replaced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))
