"""Linear layers whose input (and output heads) are transformed at run time: the online rotation a
rotated model needs, then the per-token activation quantizer; for k/v, the KV-cache quantizer.

A ``TransformedLinear`` is an ``nn.Linear`` (same weight and bias, same state dict), so the engine,
the exports and the diagnostics treat it as one; only its forward differs. The engine asks it for
``prepare(x)``, the input its matmul really sees, to build the statistics the solvers work on.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .quant.activation import ActivationGrid, fake_quantize_heads


class TransformedLinear(nn.Linear):
    online = None                          # a ``quant.hadamard.Rotation`` applied to the input, or None
    act: ActivationGrid = ActivationGrid()
    heads: tuple[int, ActivationGrid] | None = None    # (head_dim, grid): the output quantized per head (KV)

    @classmethod
    def of(cls, layer: nn.Linear) -> "TransformedLinear":
        """``layer`` itself, turned into a transformed linear that changes nothing yet (weights shared)."""
        if type(layer) is nn.Linear:     # a plain linear only: a subclass's own forward would be lost
            layer.__class__ = cls
        elif not isinstance(layer, cls):
            raise TypeError(f"cannot transform the input of a {type(layer).__name__}; only nn.Linear layers")
        return layer

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.online is not None:
            x = self.online.apply(x)
        return self.act(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_through(self, x, self.weight)


def linear_through(layer: nn.Linear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer``'s forward with ``weight`` in place of its own (what learned rounding trains through)."""
    y = F.linear(prepare(layer, x), weight, layer.bias)
    heads = getattr(layer, "heads", None)
    return y if heads is None else fake_quantize_heads(y, *heads)


def prepare(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input ``layer``'s matmul sees for ``x``."""
    return layer.prepare(x) if isinstance(layer, TransformedLinear) else x


def quantizes_activations(module: nn.Module) -> bool:
    return any(isinstance(m, TransformedLinear) and (m.act.active or m.heads is not None) for m in module.modules())


def full_precision_copy(block: nn.Module) -> nn.Module:
    """A copy of ``block`` computing in full precision: online rotations kept (they are part of the
    rotated model's function), activation and KV quantizers off."""
    fp = copy.deepcopy(block)
    for m in fp.modules():
        if isinstance(m, TransformedLinear):
            m.act, m.heads = ActivationGrid(), None
    return fp


def install(model: nn.Module, family, layers: list[tuple[int, str]], act: ActivationGrid, kv: ActivationGrid):
    """Quantize the inputs of ``layers`` ((block, kind) pairs) with ``act``, and the key and value heads of
    their blocks' k/v layers with ``kv``. Layers outside the list keep full-precision activations."""
    blocks = family.blocks(model)
    head_dim = family.geometry(model.config).head_dim
    for b, kind in layers:
        layer = TransformedLinear.of(family.linear(blocks[b], kind))
        layer.act = act
        if kv.active and kind in family.attention_kinds[1:]:    # (q, k, v)[1:]: what a KV cache holds
            layer.heads = (head_dim, kv)


def online_only(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` after ``layer``'s online rotation alone: the full-precision input its quantizer sees."""
    online = getattr(layer, "online", None)
    return x if online is None else online.apply(x)
