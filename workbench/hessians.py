"""Streaming second moments of layer inputs: running sums over calibration batches.

Only the sums live across batches, never the activations: ``H_in`` is ``d_in x d_in``
(float32), the cross moment for inherited-error correction has the same size.
"""
from __future__ import annotations

import torch


class InputCovariance:
    """``H = 2/n sum_t x_t x_t^T`` and, given a reference stream, ``C = 2/n sum_t (x_ref - x)_t x_t^T``."""

    def __init__(self, d: int, device, with_cross: bool = False):
        self.sum = torch.zeros(d, d, device=device)
        self.cross = torch.zeros(d, d, device=device) if with_cross else None
        self.n = 0

    def add(self, x: torch.Tensor, x_ref: torch.Tensor | None = None):
        x2 = x.reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x2.T, x2)
        if self.cross is not None:
            dx = x_ref.reshape(-1, x.shape[-1]).float() - x2
            self.cross.addmm_(dx.T, x2)
        self.n += x2.shape[0]

    @property
    def H(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.n, 1))

    @property
    def C(self) -> torch.Tensor | None:
        return None if self.cross is None else self.cross * (2.0 / max(self.n, 1))


def relative_error(dW: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """``||dW X||^2 / ||W X||^2`` from ``H ~ X X^T`` (any positive scale cancels)."""
    num = ((dW @ H) * dW).sum()
    den = ((W @ H) * W).sum()
    return float(num / den) if den > 0 else 0.0
