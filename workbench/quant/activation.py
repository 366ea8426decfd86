"""Per-token dynamic fake quantization of activations (a linear layer's input, a head's keys and values).

Every token (every row over the last dimension) gets its own grid from its own range at run time,
as a W4A4 kernel computes it: ``bits`` levels over ``clip`` times the row's range. At ``clip`` 1
the quantizer is idempotent (a quantized row's range is its grid's end points), so a layer that
quantizes an input the engine already quantized changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

OFF = 16                                       # act/kv bits that mean "not quantized"
BITS = (4, 6, 8, OFF)
CLIP_CANDIDATES = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))     # 1.0 down to 0.5


@dataclass(frozen=True)
class ActivationGrid:
    bits: int = OFF
    symmetric: bool = False
    clip: float = 1.0

    @property
    def active(self) -> bool:
        return self.bits < OFF

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_tokens(x, self.bits, self.symmetric, self.clip) if self.active else x


def fake_quantize_tokens(x: torch.Tensor, bits: int, symmetric: bool, clip: float = 1.0) -> torch.Tensor:
    """``x`` rounded to a per-row grid of ``bits`` over its last dimension, in x's dtype."""
    xf = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (xf.abs().amax(-1, keepdim=True) * clip / qmax).clamp_min(1e-8)
        q = torch.clamp(torch.round(xf / scale), -qmax - 1, qmax)
        return _through(x, q * scale)
    levels = 2 ** bits - 1
    lo = (xf.amin(-1, keepdim=True) * clip).clamp_max(0.0)
    hi = (xf.amax(-1, keepdim=True) * clip).clamp_min(0.0)
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(xf / scale) + zero, 0, levels)
    return _through(x, (q - zero) * scale)


def _through(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """``xq`` in x's dtype; under autograd the gradient passes straight through the rounding (block-wise
    reconstruction trains earlier layers through later layers' quantized inputs)."""
    xq = xq.to(x.dtype)
    return x + (xq - x).detach() if x.requires_grad else xq


def fake_quantize_heads(t: torch.Tensor, head_dim: int, grid: ActivationGrid) -> torch.Tensor:
    """``[..., n * head_dim]`` quantized per head and token (a KV cache's layout)."""
    if not grid.active:
        return t
    shape = t.shape
    return grid(t.reshape(*shape[:-1], -1, head_dim)).reshape(shape)


def relative_error(x: torch.Tensor, xq: torch.Tensor) -> float:
    """||Q(x) - x||^2 / ||x||^2."""
    den = float(x.float().pow(2).sum())
    return float((xq.float() - x.float()).pow(2).sum()) / den if den > 0 else 0.0


def search_clip(samples: list[torch.Tensor], bits: int, symmetric: bool,
                candidates: tuple[float, ...] = CLIP_CANDIDATES) -> float:
    """The clip ratio of ``candidates`` with the least squared error on ``samples`` (ties: the larger)."""
    best, best_err = 1.0, float("inf")
    for c in candidates:
        err = sum(float((fake_quantize_tokens(x, bits, symmetric, c).float() - x.float()).pow(2).sum())
                  for x in samples)
        if err < best_err:
            best, best_err = c, err
    return best
