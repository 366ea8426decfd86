"""Small BatchNorm CNNs built in the tests (no torchvision)."""
from __future__ import annotations

import torch
from torch import nn

from workbench.genie.model import BasicBlock


class ResNet18Shaped(nn.Module):
    """ResNet-18's layout (7x7/2 stem, max pool, 4 stages of 2 basic blocks) at narrow widths."""

    def __init__(self, widths=(8, 16, 32, 64), num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in, stages = widths[0], []
        for i, c in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(c_in, c, 1 if i == 0 else 2), BasicBlock(c, c)))
            c_in = c
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def smooth_images(n: int, shape, seed: int = 0) -> torch.Tensor:
    """Blurred noise with a bright blob: images with spatial structure, unlike white noise."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    x = torch.randn(n, c, h, w, generator=g)
    x = nn.functional.avg_pool2d(x, 5, 1, 2) * 3
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    centre = torch.rand(n, 2, 1, 1, generator=g) - 0.5
    blob = torch.exp(-((yy - centre[:, :1]) ** 2 + (xx - centre[:, 1:]) ** 2) * 6)
    return x + 2 * blob - 0.5


def randomize_bn(model: nn.Module, shape, seed: int = 0) -> nn.Module:
    """Random affine BN parameters, running statistics measured on structured images: a
    stand-in for a trained model, whose statistics some data set really has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.reset_running_stats()
                m.momentum = None          # cumulative average over the passes below
        model.train()
        data = smooth_images(256, shape, seed)
        for i in range(0, 256, 64):
            model(data[i:i + 64])
    return model.eval()
