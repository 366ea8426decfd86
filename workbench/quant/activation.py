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
SEARCH_ROWS = 1024


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
    # every op after the first works in place on one buffer: this runs on every linear's input in evaluation
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = xf.abs().amax(-1, keepdim=True).mul_(clip / qmax).clamp_min_(1e-8)
        q = xf.div(scale).round_().clamp_(-qmax - 1, qmax)
        return _through(x, q.mul_(scale))
    levels = 2 ** bits - 1
    lo, hi = torch.aminmax(xf, dim=-1, keepdim=True)
    lo, hi = lo.mul_(clip).clamp_max_(0.0), hi.mul_(clip).clamp_min_(0.0)
    scale = hi.sub_(lo).div_(levels).clamp_min_(1e-8)
    zero = lo.div_(scale).neg_().round_()
    q = xf.div(scale).round_().add_(zero).clamp_(0, levels)
    return _through(x, q.sub_(zero).mul_(scale))


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


def search_clip(x: torch.Tensor, bits: int, symmetric: bool,
                candidates: tuple[float, ...] = CLIP_CANDIDATES, rows: int = SEARCH_ROWS) -> float:
    """The clip ratio of ``candidates`` with the least squared error on the tokens of ``x`` (ties: the larger), on
    at most ``rows`` of them taken evenly (one scalar: a thousand tokens choose it as well as all)."""
    tokens = x.reshape(-1, x.shape[-1]).float()
    tokens = tokens[::max(1, tokens.shape[0] // rows)]
    best, best_err = 1.0, float("inf")
    for c in candidates:
        err = float((fake_quantize_tokens(tokens, bits, symmetric, c) - tokens).pow(2).sum())
        if err < best_err:
            best, best_err = c, err
    return best
