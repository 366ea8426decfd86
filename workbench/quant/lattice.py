"""GGUF's block types as grids: the exact values a llama.cpp file can store.

A lattice fixes what a plain integer grid leaves free. Its scales are float16 (``q4_0``,
``q4_1``, ...) or, for the K-quants, integer multiples of one float16 ``d`` per super-block of
256 weights; asymmetric types store a minimum instead of an integer zero point
(``w = scale * code - minimum``, ``minimum = dmin * m`` in the K-quants). Grids made here are
on the lattice from the start, so the solvers compensate the error the file will have.

The byte layouts are in ``workbench.gguf_blocks``; the values follow ggml's dequantization:
``q4_0`` ``d * (q - 8)``, ``q4_1`` ``d * q + m``, ``q4_k`` ``(d * sc) * q - dmin * mn``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import WorkbenchError

SUPER_BLOCK = 256     # weights per K-quant super-block


@dataclass(frozen=True)
class Lattice:
    name: str
    bits: int
    block: int              # weights per stored block (32, or a 256 super-block)
    sub_block: int          # weights per scale
    min_offset: bool        # a stored minimum (w = s q - m); else the fixed zero point 2^(b-1)
    scale_levels: int = 0   # K-quants: sub-block scales are d * 1..scale_levels
    min_levels: int = 0     # K-quants: sub-block minimums are dmin * 0..min_levels

    @property
    def symmetric(self) -> bool:
        return not self.min_offset

    @property
    def super_block(self) -> bool:
        return self.scale_levels > 0


# scale levels: the positive range of each type's sub-block scale (q3_k's 6-bit scales are signed,
# sc - 32 in [-32, 31]; q6_k's are int8)
LATTICES: dict[str, Lattice] = {lat.name: lat for lat in (
    Lattice("q4_0", 4, 32, 32, False),
    Lattice("q4_1", 4, 32, 32, True),
    Lattice("q5_0", 5, 32, 32, False),
    Lattice("q5_1", 5, 32, 32, True),
    Lattice("q8_0", 8, 32, 32, False),
    Lattice("q2_k", 2, SUPER_BLOCK, 16, True, scale_levels=15, min_levels=15),
    Lattice("q3_k", 3, SUPER_BLOCK, 16, False, scale_levels=31),
    Lattice("q4_k", 4, SUPER_BLOCK, 32, True, scale_levels=63, min_levels=63),
    Lattice("q5_k", 5, SUPER_BLOCK, 32, True, scale_levels=63, min_levels=63),
    Lattice("q6_k", 6, SUPER_BLOCK, 16, False, scale_levels=127),
)}


def lattice(name: str) -> Lattice:
    try:
        return LATTICES[name]
    except KeyError:
        raise WorkbenchError(f"unknown GGUF type {name!r}; choose one of {', '.join(LATTICES)}") from None


def types_for_width(d_in: int) -> list[str]:
    return [n for n, lat in LATTICES.items() if d_in % lat.block == 0]


def to_float16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest float16 (kept positive: a scale that underflows would divide by 0)."""
    finfo = torch.finfo(torch.float16)
    least = finfo.smallest_normal * finfo.eps
    return x.float().clamp(min=least, max=finfo.max).to(torch.float16).float()


def minimum_to_float16(m: torch.Tensor) -> torch.Tensor:
    finfo = torch.finfo(torch.float16)
    return m.float().clamp(min=-finfo.max, max=finfo.max).to(torch.float16).float()


def place_scales(scale: torch.Tensor, lat: Lattice) -> torch.Tensor:
    """Sub-block scales ``[..., G]`` (G along the row) as the nearest the lattice stores."""
    if not lat.super_block:
        return to_float16(scale)
    per = SUPER_BLOCK // lat.sub_block
    s = scale.reshape(*scale.shape[:-1], -1, per)
    d = to_float16(s.amax(-1, keepdim=True) / lat.scale_levels)
    # the largest scale of a super-block is d * levels exactly (d is its float16 quotient): the
    # export reads d back from it
    sc = torch.round(s / d).clamp(1, lat.scale_levels)
    return (d * sc).reshape(scale.shape)


def place_minimums(minimum: torch.Tensor, lat: Lattice) -> torch.Tensor:
    """Sub-block minimums ``[..., G]`` (>= 0 for K-quants) as the nearest the lattice stores."""
    if not lat.super_block:
        return minimum_to_float16(minimum)
    per = SUPER_BLOCK // lat.sub_block
    m = minimum.clamp(min=0).reshape(*minimum.shape[:-1], -1, per)
    top = m.amax(-1, keepdim=True)
    dmin = torch.where(top > 0, to_float16(top / lat.min_levels), torch.zeros_like(top))
    mn = torch.where(dmin > 0, torch.round(m / dmin.clamp(min=1e-30)), torch.zeros_like(m)).clamp(0, lat.min_levels)
    return (dmin * mn).reshape(minimum.shape)


def super_block_factor(values: torch.Tensor, levels: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d, k)`` with ``values == d * k`` exactly, k integers in ``[0, levels]``, one float16 ``d``
    per super-block: values ``[rows, n_super, per]`` -> d ``[rows, n_super]``, k like values.

    Raises when the values are not on the lattice (changed after the grid was made).
    """
    top = values.amax(-1, keepdim=True)
    d = torch.where(top > 0, to_float16(top / levels), torch.zeros_like(top))
    k = torch.where(d > 0, torch.round(values / d.clamp(min=1e-30)), torch.zeros_like(values))
    if not torch.equal(d * k, values) or bool((k < 0).any()) or bool((k > levels).any()):
        raise WorkbenchError(f"the {what} are not on the GGUF lattice (integer multiples of one float16 per "
                             f"super-block); quantize with the same --format")
    return d.squeeze(-1), k
