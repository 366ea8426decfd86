"""Streaming second moments of layer inputs: running sums over calibration batches.

Only the sums live across batches, never the activations: ``H_in`` is ``d_in x d_in``
(summed in float64, read in float32), the cross moment for inherited-error correction has the same size.
"""
from __future__ import annotations

import torch


def add_gram(acc: torch.Tensor, y: torch.Tensor, blocks: int = 3):
    """``acc += y^T y`` on the diagonal and upper blocks only (``y [..., n, d]``, ``acc [..., d, d]``).

    The product is symmetric, so a third of it is skipped; ``symmetric_from_upper`` completes
    ``acc`` when it is read. On 2 cores: 50 -> 34 ms for d = 1536 and 2048 rows.
    """
    add_upper_product(acc, y, y, blocks)


def add_upper_product(acc: torch.Tensor, y: torch.Tensor, z: torch.Tensor, blocks: int = 3):
    """``acc += y^T z`` on the diagonal and upper blocks only, for a product known to be symmetric
    (``y^T z = z^T y``, as for ``z = M y`` with a symmetric ``M``)."""
    d = acc.shape[-1]
    width = -(-d // blocks)
    for i0 in range(0, d, width):
        acc[..., i0:i0 + width, i0:].add_(y[..., i0:i0 + width].transpose(-1, -2) @ z[..., i0:])


def symmetric_from_upper(acc: torch.Tensor) -> torch.Tensor:
    """The full, exactly symmetric matrix of an ``add_gram`` accumulator (a new tensor)."""
    upper = acc.triu(1)
    return upper + upper.transpose(-1, -2) + torch.diag_embed(acc.diagonal(dim1=-2, dim2=-1))


class InputCovariance:
    """``H = 2/n sum_t x_t x_t^T`` and, given a reference stream, ``C = 2/n sum_t (x_ref - x)_t x_t^T``."""

    def __init__(self, d: int, device, with_cross: bool = False):
        # float64 sums of float32 batch products: the total no longer depends on the order of the batches
        # (one process or several, in any order), and the solve reads it back in float32
        self.sum = torch.zeros(d, d, device=device, dtype=torch.float64)
        self.cross = torch.zeros(d, d, device=device, dtype=torch.float64) if with_cross else None
        self.n = 0
        self._H: torch.Tensor | None = None    # H as last read; every layer of a stage reads it

    def add(self, x: torch.Tensor, x_ref: torch.Tensor | None = None):
        x2 = x.reshape(-1, x.shape[-1]).float()
        add_gram(self.sum, x2)           # upper blocks only: read it through ``H``
        if self.cross is not None:
            dx = x_ref.reshape(-1, x.shape[-1]).float() - x2
            self.cross.add_(dx.T @ x2)
        self.n += x2.shape[0]
        self._H = None

    def reduce(self, ranks):
        """Sums over the ranks of a data-parallel run (``distributed.Ranks``), before the solve."""
        if ranks.active:
            ranks.sum_(self.sum, self.cross)
            self.n = int(ranks.sum_numbers(self.n)[0])
            self._H = None

    @property
    def H(self) -> torch.Tensor:
        if self._H is None:
            self._H = symmetric_from_upper(self.sum).mul_(2.0 / max(self.n, 1)).float()
        return self._H

    @property
    def C(self) -> torch.Tensor | None:
        return None if self.cross is None else (self.cross * (2.0 / max(self.n, 1))).float()


def relative_error(dW: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """``||dW X||^2 / ||W X||^2`` from ``H ~ X X^T`` (any positive scale cancels)."""
    num = ((dW @ H) * dW).sum()
    den = ((W @ H) * W).sum()
    return float(num / den) if den > 0 else 0.0
