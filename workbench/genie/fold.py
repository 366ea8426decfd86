"""Fold BatchNorm into the convolution that feeds it, as a deployed integer model would.

Which conv feeds which BN is read from one traced forward pass (the BN's input is the very
tensor the conv returned), so any module layout works, not just conv-then-BN attribute pairs.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv computing bn(conv(x)) in eval mode: w' = w * g/sd, b' = (b - mu) * g/sd + beta."""
    with torch.no_grad():
        inv = torch.rsqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(inv)
        beta = bn.bias if bn.affine else torch.zeros_like(inv)
        factor = gamma * inv
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
        fused = fused.to(conv.weight.device)
        fused.weight.copy_(conv.weight * factor.view(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean) * factor + beta)
    return fused


def conv_bn_pairs(model: nn.Module, sample: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, bn name) pairs where the BN consumes the conv's output directly."""
    outputs, pairs = {}, []
    names = {m: n for n, m in model.named_modules()}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda mod, a, out: outputs.__setitem__(id(out), mod)))
        elif isinstance(m, nn.BatchNorm2d):
            def pre(mod, args):
                conv = outputs.get(id(args[0]))
                if conv is not None and (names[conv], names[mod]) not in pairs:
                    pairs.append((names[conv], names[mod]))
            hooks.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in hooks:
            h.remove()
    return pairs


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def fold_batchnorm(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """A copy of ``model`` (eval mode) with every conv-fed BN folded and replaced by Identity."""
    folded = copy.deepcopy(model).eval()
    for conv_name, bn_name in conv_bn_pairs(folded, sample):
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        set_module(folded, conv_name, fold_into_conv(conv, bn))
        set_module(folded, bn_name, nn.Identity())
    return folded
