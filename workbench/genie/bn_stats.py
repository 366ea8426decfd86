"""Batch-norm statistics matching: the signal Genie distills images from.

Every BatchNorm2d layer of a trained model remembers the per-channel mean and variance of its
input over the training data. A synthetic batch whose BN inputs have the same statistics, at
every layer, looks like training data to the network.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..errors import WorkbenchError


def batchnorm_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The model's BatchNorm2d layers with running statistics; raises when there are none."""
    layers = [m for m in model.modules()
              if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None]
    if not layers:
        raise WorkbenchError(
            f"{type(model).__name__} has no BatchNorm2d layers with running statistics; Genie distills "
            "data from those statistics, so use a CNN trained with BatchNorm, or calibrate on real "
            "data instead (--data real)")
    return layers


def channel_stats(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation over batch and space of ``x`` [N, C, H, W]."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return mean, torch.sqrt(var + eps)


def bn_layer_loss(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """||mu(x) - mu_BN||^2 + ||sigma(x) - sigma_BN||^2 for the input ``x`` of one BN layer."""
    mean, std = channel_stats(x, bn.eps)
    return ((mean - bn.running_mean) ** 2).sum() + ((std - torch.sqrt(bn.running_var + bn.eps)) ** 2).sum()


class BNStatsLoss:
    """Collects the BN-statistics loss of every forward pass while active (a context manager).

    ``with BNStatsLoss(model) as stats: model(x); loss = stats.total()``
    """

    def __init__(self, model: nn.Module):
        self.layers = batchnorm_layers(model)
        self.losses: list[torch.Tensor] = []
        self._handles = []

    def _hook(self, bn, args):
        self.losses.append(bn_layer_loss(args[0], bn))

    def __enter__(self):
        self._handles = [bn.register_forward_pre_hook(self._hook) for bn in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self):
        self.losses = []

    def total(self) -> torch.Tensor:
        if not self.losses:
            raise WorkbenchError("no BatchNorm layer ran: call the model inside the BNStatsLoss context")
        return torch.stack(self.losses).sum()


@contextmanager
def frozen(model: nn.Module):
    """Eval mode (BN uses running statistics) and no parameter gradients, restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@torch.no_grad()
def bn_stats_loss(model: nn.Module, x: torch.Tensor) -> float:
    """The BN-statistics loss of a fixed batch (for reports and tests)."""
    with frozen(model), BNStatsLoss(model) as stats:
        model(x)
        return float(stats.total())
