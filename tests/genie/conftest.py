"""Fixtures: small BatchNorm CNNs with running statistics measured on structured images."""
from __future__ import annotations

import pytest
import torch

from genie_nets import ResNet18Shaped, randomize_bn
from workbench.genie.model import DigitsResNet, ModelConfig


@pytest.fixture
def resnet18_shaped():
    torch.manual_seed(0)
    return randomize_bn(ResNet18Shaped(), (3, 32, 32))


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    return randomize_bn(DigitsResNet(ModelConfig(widths=(8, 16, 16))), (1, 16, 16))
