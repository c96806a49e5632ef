"""OFA's convolutional trunk: the first three stages of a ResNet.

OFA embeds an image as the layer3 feature map of a Bottleneck ResNet (1024
channels, stride 16: 30x30 tokens at 480 px). There is no layer4, pooling or
classifier head, and the block is Bottleneck V1.5 (stride on the 3x3) even for
the resnet18/34 names.
"""

from __future__ import annotations

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

    def use_channels_last(self) -> None:
        """Run the convolutions in NHWC, oneDNN's and cuDNN's native layout.

        In bf16 on CPU this is ~2x faster: NCHW costs a copy of every input in
        and out of oneDNN's layout. fp32 keeps NCHW because that is the layout
        the reference runs, and NHWC's different summation order moves random
        checkpoints' scores up to 5e-4, most of the parity tolerance."""
        self.channels_last = True
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))
