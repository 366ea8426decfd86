"""The one shape of a quantized weight, from the solvers through the engine to export."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import GridConfig, grid_functions


@dataclass
class QuantizedWeight:
    """Integer codes on a grid: ``W_hat = scale * (codes - zero)`` per group of input columns
    (``scale * codes - zero`` on a GGUF lattice with a stored minimum, ``grid.min_offset``)."""
    codes: torch.Tensor     # [d_out, d_in] integers in [0, 2^bits - 1] (uint8)
    scale: torch.Tensor     # [d_out, n_groups]
    zero: torch.Tensor      # [d_out, n_groups]: zero points in codes, or minimums in weight units
    grid: GridConfig

    def dequantize(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The weight in float32; ``scale`` replaces the stored one (e.g. as a format stores it)."""
        d_out, d_in = self.codes.shape
        s = (self.scale if scale is None else scale).float()
        groups = s.shape[-1]
        dequantize = grid_functions(self.grid)[2]
        # per group by broadcasting: the same products as with the grids expanded to every column, without
        # two more weight-sized tensors (rebuilding a whole model's weights is a few times faster)
        codes = self.codes.reshape(d_out, groups, d_in // groups).float()
        return dequantize(codes, s.unsqueeze(-1), self.zero.float().unsqueeze(-1)).reshape(d_out, d_in)

    def cpu(self) -> "QuantizedWeight":
        return QuantizedWeight(self.codes.cpu(), self.scale.cpu(), self.zero.cpu(), self.grid)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


def from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: GridConfig) -> QuantizedWeight:
    """A ``QuantizedWeight`` from tensors of any batch layout, as ``[d_out, d_in]`` / ``[d_out, n_groups]``."""
    d_out = codes.shape[0] if codes.dim() == 2 else codes.shape[0] * codes.shape[1]
    codes = codes.round() if codes.is_floating_point() else codes
    return QuantizedWeight(codes.reshape(d_out, -1).to(torch.uint8), scale.reshape(d_out, -1).float(),
                           zero.reshape(d_out, -1).float(), grid)
