"""Quantized stand-ins for Conv2d and Linear, and where the blocks of a CNN are.

A QuantLayer reads its weight from a LearnedRounding (soft while a block is optimized, hard
afterwards) and quantizes its input when given an activation quantizer. Round-to-nearest is the
same object left in hard mode from the start: h(V) begins at the fractional part of W / s.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WorkbenchError
from ..quant.grid import GridConfig
from ..quant.rounding import LearnedRounding
from .act_quant import ActQuantizer

LAYER_TYPES = (nn.Conv2d, nn.Linear)


class QuantLayer(nn.Module):
    def __init__(self, layer: nn.Module, grid: GridConfig, act_bits: int = 0, learn_scale: bool = False):
        super().__init__()
        if not isinstance(layer, LAYER_TYPES):
            raise WorkbenchError(f"can only quantize Conv2d and Linear layers, got {type(layer).__name__}")
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise WorkbenchError(f"conv padding mode {layer.padding_mode!r} is not supported; use zeros")
        self.layer = layer
        self.layer.weight.requires_grad_(False)
        self.rounder = LearnedRounding(layer.weight, grid, learn_scale=learn_scale).to(layer.weight.device)
        self.rounder.hard = True
        self.bias = None if layer.bias is None else layer.bias.detach()
        self.act = ActQuantizer(act_bits) if act_bits else None
        self.weight_bits = grid.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        w = self.rounder()
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.bias)
        c = self.layer
        return F.conv2d(x, w, self.bias, c.stride, c.padding, c.dilation, c.groups)


def _has_layers(m: nn.Module) -> bool:
    return any(isinstance(x, LAYER_TYPES) for x in m.modules())


def _is_container(m: nn.Module) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def find_units(model: nn.Module, prefix: str = "") -> list[str]:
    """Names of the reconstruction units in execution-tree order.

    A lone Conv2d/Linear is a unit; a residual block (any non-container module holding layers)
    is a unit; a container of plain leaves (e.g. conv, BN, ReLU) is a unit with its activation;
    other containers are split into their children.
    """
    units = []
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if not _has_layers(child):
            continue
        if isinstance(child, LAYER_TYPES):
            units.append(full)
        elif _is_container(child) and any(_has_layers(c) and not isinstance(c, LAYER_TYPES)
                                          for c in child.children()):
            units += find_units(child, full + ".")
        else:
            units.append(full)
    return units


def layer_names(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, LAYER_TYPES)]
