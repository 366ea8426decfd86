"""Uniform integer grids: q(w) = s * (clamp(round(w / s) + z, 0, 2^b - 1) - z).

A grid is computed over the last dimension of a tensor: a whole output row (per channel) or
one group of input columns. Shapes: ``w[..., n] -> scale[..., 1], zero[..., 1]``.

A grid on a GGUF lattice (``GridConfig.lattice``, see ``quant.lattice``) has float16 scales, and
for the asymmetric types a stored minimum in place of the integer zero point:
q(w) = s * clamp(round((w + m) / s), 0, 2^b - 1) - m. The ``zero`` tensors then hold ``m``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import WorkbenchError
from .compiled import kernel
from .lattice import SUPER_BLOCK, lattice, place_minimums, place_scales, types_for_width
from .native import mse_screen

SEARCHES = ("minmax", "mse", "hessian")   # hessian: MSE weighted by diag(H_in) per column


@dataclass(frozen=True)
class GridConfig:
    bits: int = 4
    group_size: int = 64          # input columns per group; -1 = one grid per output row
    symmetric: bool = False
    search: str = "minmax"        # "mse": shrink the range to minimise the |error|^norm
    mse_steps: int = 80
    mse_max_shrink: float = 0.8
    mse_norm: float = 2.4
    lattice: str | None = None    # a GGUF block type: grids on exactly the values its file stores

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise WorkbenchError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.group_size != -1 and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise WorkbenchError(
                f"group size must be a positive integer or -1 (per channel), got {self.group_size!r}")
        if self.search not in SEARCHES:
            raise WorkbenchError(f"unknown grid search {self.search!r}; choose one of {', '.join(SEARCHES)}")
        if self.lattice is not None:
            lat = lattice(self.lattice)
            if (self.bits, self.group_size, self.symmetric) != (lat.bits, lat.sub_block, lat.symmetric):
                raise WorkbenchError(f"GGUF {lat.name} stores {lat.bits}-bit {'symmetric' if lat.symmetric else 'asymmetric'} "
                                     f"groups of {lat.sub_block}; got {self.bits} bits, group size {self.group_size}, "
                                     f"symmetric {self.symmetric}")

    @classmethod
    def for_lattice(cls, name: str, search: str = "minmax") -> "GridConfig":
        lat = lattice(name)
        return cls(bits=lat.bits, group_size=lat.sub_block, symmetric=lat.symmetric, search=search, lattice=name)

    @property
    def min_offset(self) -> bool:
        """The grid stores a minimum ``m`` (``q = s c - m``) rather than an integer zero point."""
        return self.lattice is not None and lattice(self.lattice).min_offset

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def group_width(self, d_in: int) -> int:
        """Columns per grid for a layer with ``d_in`` inputs; raises if groups do not tile it."""
        if self.lattice is not None and d_in % lattice(self.lattice).block:
            fits = types_for_width(d_in)
            raise WorkbenchError(
                f"GGUF {self.lattice} stores rows in blocks of {lattice(self.lattice).block} weights; a layer has "
                f"{d_in} inputs, so choose a type that fits: {', '.join(fits) if fits else 'none'}")
        if self.group_size == -1:
            return d_in
        if d_in % self.group_size:
            raise WorkbenchError(
                f"group size {self.group_size} does not divide the input width {d_in}; "
                f"pick a divisor of {d_in} (e.g. {largest_divisor_at_most(d_in, self.group_size)}) "
                f"or -1 for per-channel grids")
        return self.group_size

    def grid_unit(self, d_in: int) -> int:
        """Columns whose grids are made together: a group, or a K-quant super-block of groups."""
        width = self.group_width(d_in)
        return SUPER_BLOCK if self.lattice is not None and lattice(self.lattice).super_block else width


def largest_divisor_at_most(n: int, k: int) -> int:
    return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


def minmax_params(w: torch.Tensor, maxq: int, symmetric: bool, shrink: float | torch.Tensor = 1.0,
                  min_offset: bool = False):
    """Scale and zero point covering ``shrink`` x the range of ``w`` over its last dim."""
    return range_params(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), maxq, symmetric, shrink, min_offset)


def range_params(lo: torch.Tensor, hi: torch.Tensor, maxq: int, symmetric: bool, shrink: float | torch.Tensor = 1.0,
                 min_offset: bool = False):
    """Scale and zero point covering ``shrink`` x ``[lo, hi]`` (and 0); with ``min_offset`` the
    minimum ``-lo`` in place of the zero point."""
    lo = (lo * shrink).clamp(max=0)
    hi = (hi * shrink).clamp(min=0)
    if symmetric:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    span = hi - lo
    # all-zero rows: any positive scale reproduces them exactly
    scale = torch.where(span > 0, span / maxq, torch.ones_like(span))
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    elif min_offset:
        zero = -lo
    else:
        zero = torch.round(-lo / scale)
    return scale, zero


def fake_quantize_min(w: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, maxq: int) -> torch.Tensor:
    return scale * torch.clamp(torch.round((w + minimum) / scale), 0, maxq) - minimum


def quantize_codes_min(w: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round((w + minimum) / scale), 0, maxq)


def dequantize_min(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    return scale * codes - minimum


def grid_functions(cfg: "GridConfig"):
    """``(fake_quantize, quantize_codes, dequantize)`` of the grid's form (zero point or minimum)."""
    if cfg.min_offset:
        return fake_quantize_min, quantize_codes_min, dequantize_min
    return fake_quantize, quantize_codes, dequantize


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def shrink_factors(cfg: GridConfig, like: torch.Tensor) -> torch.Tensor:
    """The fractions of a slice's range the searches try: 1, then down in ``mse_steps`` to ``1 - mse_max_shrink``."""
    return torch.tensor([1 - i / cfg.mse_steps for i in range(int(cfg.mse_max_shrink * cfg.mse_steps) + 1)],
                        dtype=like.dtype, device=like.device)


def mse_params(w: torch.Tensor, cfg: GridConfig):
    """Grid search over shrunk ranges, keeping per row the one with the least |error|^norm (the
    first of equal ones).

    Each candidate is one fused pass over ``w`` (``kernel``): the search is a fixed cost of every
    method that takes MSE grids, and in eager mode it cost as much as a GPTQ solve. On the CPU the
    C screen (``native.mse_screen``) first rules out most candidates of each row.
    """
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    shrinks = shrink_factors(cfg, w)
    approx = mse_screen(w.reshape(-1, w.shape[-1]), lo.reshape(-1), hi.reshape(-1), shrinks, cfg.maxq,
                        cfg.symmetric, cfg.min_offset, cfg.mse_norm, SCREEN_MARGIN, SCREEN_FLOOR)
    if approx is not None:
        return screened_search(w, lo, hi, shrinks, approx, cfg)
    best_scale, best_zero = range_params(lo, hi, cfg.maxq, cfg.symmetric, min_offset=cfg.min_offset)
    best_err = range_error(w, best_scale, best_zero, cfg.maxq, cfg.mse_norm, cfg.min_offset)
    step = kernel(mse_search_step, dynamic=True)
    for shrink in shrinks[1:]:
        best_err, best_scale, best_zero = step(w, lo, hi, shrink, best_err, best_scale, best_zero,
                                               cfg.maxq, cfg.symmetric, cfg.mse_norm, cfg.min_offset)
    return best_scale, best_zero


# the screen's errors and the exact ones are each within 1e-4 of the true sums (the screen's power
# 2e-5, sums of 16 lanes in float for rows up to ~100k weights): a candidate whose screened error
# is above margin x a row's least cannot be the least; the floor covers errors that underflow
SCREEN_MARGIN = (1 + 1e-3) / (1 - 1e-3)
SCREEN_FLOOR = 1e-30
SCREEN_CEILING = 1e37      # rows with errors near float's overflow keep every candidate


def screened_search(w, lo, hi, shrinks, approx, cfg: GridConfig):
    """``mse_params``' choice from the screen's errors ``approx [rows, candidates]``: a row with one
    candidate left takes it, the others the least exact error of the candidates left.

    The exact errors are the eager search's (``WORKBENCH_COMPILE=0``), so is the choice; the
    compiled step kernel sums a row in another order, so that a tie to float rounding may go the
    other way there. Nothing is compiled here: the kernel's first compile took 5 s of a run."""
    width = w.shape[-1]
    rows, lo_r, hi_r = w.reshape(-1, width), lo.reshape(-1, 1), hi.reshape(-1, 1)
    least = approx.amin(-1, keepdim=True)
    near = (approx <= least * SCREEN_MARGIN + SCREEN_FLOOR) | ~(least < SCREEN_CEILING)
    choice = approx.argmin(-1)
    open_rows = (near.sum(-1) > 1).nonzero().squeeze(-1)
    if open_rows.numel():
        choice[open_rows] = exact_choice(rows, lo_r, hi_r, shrinks, near, open_rows, cfg)
    scale, zero = range_params(lo_r, hi_r, cfg.maxq, cfg.symmetric, shrinks[choice].unsqueeze(-1), cfg.min_offset)
    shape = (*w.shape[:-1], 1)
    return scale.reshape(shape), zero.reshape(shape)


def exact_choice(rows, lo, hi, shrinks, near, open_rows, cfg: GridConfig) -> torch.Tensor:
    """Per row of ``open_rows`` the first of its ``near`` candidates with the least exact error (the
    sequential search keeps the earlier of equal errors and never takes a NaN one). The first
    range's shrink is 1, the factor ``range_params`` otherwise takes: the same ops."""
    i, c = near[open_rows].nonzero(as_tuple=True)        # by row, then by candidate
    r = open_rows[i]
    s, z = range_params(lo[r], hi[r], cfg.maxq, cfg.symmetric, shrinks[c].unsqueeze(-1), cfg.min_offset)
    err = range_error(rows[r], s, z, cfg.maxq, cfg.mse_norm, cfg.min_offset).squeeze(-1).nan_to_num(nan=float("inf"))
    n = open_rows.numel()
    least = torch.full((n,), float("inf"), dtype=err.dtype).scatter_reduce(0, i, err, "amin")
    at_least = err == least[i]
    return torch.full((n,), near.shape[-1], dtype=c.dtype).scatter_reduce(0, i[at_least], c[at_least], "amin")


def weighted_params(w: torch.Tensor, weight: torch.Tensor, cfg: GridConfig):
    """The ranges of ``mse_params`` chosen by ``sum_j weight_j (q_j - w_j)^2``: with ``weight = diag(H_in)``,
    the layer's loss without the columns' cross terms, so a column the inputs excite more gets the finer
    fit (the second-order search of the BoA and TurboBoA papers' code). Every candidate of a slice at once,
    in chunks of slices; the first of equal errors wins, as in the sequential search."""
    n = w.shape[-1]
    rows = w.reshape(-1, n)
    weights = weight.to(w.dtype).expand_as(w).reshape(-1, n)
    shrinks = shrink_factors(cfg, w).view(1, -1, 1)
    scale = torch.empty(rows.shape[0], 1, dtype=w.dtype, device=w.device)
    zero = torch.empty_like(scale)
    chunk = max(1, WEIGHTED_CHUNK // (shrinks.numel() * n))
    for i in range(0, rows.shape[0], chunk):
        r, wt = rows[i:i + chunk].unsqueeze(1), weights[i:i + chunk].unsqueeze(1)      # [N, 1, n]
        s, z = range_params(r.amin(-1, keepdim=True), r.amax(-1, keepdim=True), cfg.maxq, cfg.symmetric, shrinks,
                            cfg.min_offset)                                          # [N, K, 1]
        q = fake_quantize_min(r, s, z, cfg.maxq) if cfg.min_offset else fake_quantize(r, s, z, cfg.maxq)
        best = ((q - r).square() * wt).sum(-1).nan_to_num(nan=float("inf")).argmin(-1)   # [N]
        pick = best.view(-1, 1, 1)
        scale[i:i + chunk], zero[i:i + chunk] = s.gather(1, pick).squeeze(1), z.gather(1, pick).squeeze(1)
    shape = (*w.shape[:-1], 1)
    return scale.reshape(shape), zero.reshape(shape)


WEIGHTED_CHUNK = 1 << 23    # candidate errors evaluated at once (floats): 32 MB per temporary


def range_error(w, scale, zero, maxq: int, norm: float, min_offset: bool = False) -> torch.Tensor:
    q = fake_quantize_min(w, scale, zero, maxq) if min_offset else fake_quantize(w, scale, zero, maxq)
    return (q - w).abs().pow(norm).sum(-1, keepdim=True)


def mse_search_step(w, lo, hi, shrink, best_err, best_scale, best_zero, maxq: int, symmetric: bool, norm: float,
                    min_offset: bool = False):
    """The best of the grids so far and the one of range ``shrink x [lo, hi]``, per row."""
    scale, zero = range_params(lo, hi, maxq, symmetric, shrink, min_offset)
    err = range_error(w, scale, zero, maxq, norm, min_offset)
    better = err < best_err
    return torch.where(better, err, best_err), torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)


def find_params(w: torch.Tensor, cfg: GridConfig, weight: torch.Tensor | None = None):
    """Grid of each slice along the last dim of ``w`` (a row or a group); ``weight`` (broadcast to
    ``w``) weighs each weight's error in the ``hessian`` search, and is ignored by the others."""
    if cfg.search == "hessian" and weight is not None:
        return weighted_params(w, weight, cfg)
    if cfg.search in ("mse", "hessian"):
        return mse_params(w, cfg)
    return minmax_params(w, cfg.maxq, cfg.symmetric, min_offset=cfg.min_offset)


def grouped(w: torch.Tensor, width: int) -> torch.Tensor:
    """View ``[..., d_in]`` as ``[..., d_in / width, width]``."""
    return w.reshape(*w.shape[:-1], w.shape[-1] // width, width)


def group_params(w: torch.Tensor, cfg: GridConfig, weight: torch.Tensor | None = None):
    """Per-group scale and zero for a weight ``[..., d_in]``: shapes ``[..., n_groups]``. ``weight``
    ``[..., d_in]`` (broadcast to ``w``): each column's weight in the ``hessian`` search."""
    width = cfg.group_width(w.shape[-1])
    scale, zero = find_params(grouped(w, width), cfg, None if weight is None else grouped(weight, width))
    scale, zero = scale.squeeze(-1), zero.squeeze(-1)
    if cfg.lattice is None:
        return scale, zero
    # on the lattice before any compensation, so the solvers see the error the file will have
    lat = lattice(cfg.lattice)
    return place_scales(scale, lat), (place_minimums(zero, lat) if lat.min_offset else zero)


def expand_groups(p: torch.Tensor, d_in: int) -> torch.Tensor:
    """Per-group ``[..., n_groups]`` to per-column ``[..., d_in]``."""
    return p.repeat_interleave(d_in // p.shape[-1], dim=-1)


def rtn(w: torch.Tensor, cfg: GridConfig) -> torch.Tensor:
    """Round to nearest on a min/max (or MSE) grid: the floor every method must beat."""
    scale, zero = group_params(w, cfg)
    d_in = w.shape[-1]
    return grid_functions(cfg)[0](w, expand_groups(scale, d_in), expand_groups(zero, d_in), cfg.maxq)
