"""Activation quantization with a learned step size (LSQ): x_q = s * round(clamp(x / s, qmin, qmax)).

The rounding passes gradients straight through; the step's gradient is scaled by
1 / sqrt(numel * qmax) so its updates stay in proportion to the step itself. The step starts at
the clipping range with the least squared error on calibration activations.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import WorkbenchError


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Value of x, gradient multiplied by ``factor``."""
    return x * factor + (x * (1 - factor)).detach()


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, grad_factor: float) -> torch.Tensor:
    s = scale_grad(step, grad_factor)
    return round_ste(torch.clamp(x / s, qmin, qmax)) * s


@torch.no_grad()
def mse_step(x: torch.Tensor, bits: int, signed: bool, candidates: int = 100, max_values: int = 2 ** 20,
             seed: int = 0) -> float:
    """Step size whose clipping range minimizes ||q(x) - x||^2 over a sweep of ranges."""
    flat = x.detach().flatten().float()
    if flat.numel() > max_values:
        g = torch.Generator().manual_seed(seed)
        flat = flat[torch.randint(0, flat.numel(), (max_values,), generator=g).to(flat.device)]
    qmin, qmax = int_range(bits, signed)
    peak = float(flat.abs().max()) if signed else float(flat.clamp(min=0).max())
    if peak == 0:
        return 1.0
    best, best_err = peak / max(qmax, 1), float("inf")
    for i in range(1, candidates + 1):
        step = peak * i / candidates / max(qmax, -qmin)
        err = float(((torch.clamp(torch.round(flat / step), qmin, qmax) * step - flat) ** 2).sum())
        if err < best_err:
            best, best_err = step, err
    return best


class ActQuantizer(nn.Module):
    """Quantizes its input; the first call (or ``init_from``) sets the step from the data."""

    def __init__(self, bits: int):
        super().__init__()
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise WorkbenchError(f"activation bits must be an integer from 2 to 8, got {bits!r}")
        self.bits = bits
        self.step = nn.Parameter(torch.tensor(1.0))
        self.signed = False
        self.initialized = False

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        self.signed = bool((x < 0).any())
        self.step.fill_(mse_step(x, self.bits, self.signed))
        self.initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self.init_from(x)
        qmin, qmax = int_range(self.bits, self.signed)
        factor = 1.0 / (x[0].numel() * qmax) ** 0.5
        return lsq_quantize(x, self.step.abs().clamp(min=1e-8), qmin, qmax, factor)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, step={float(self.step):.4g}"
