"""Codes and grids on a GGUF lattice, packed into ggml's block layouts byte by byte.

``gguf``'s own quantizers take float weights and choose the scales themselves, which would undo
the solver's grids; here the integer codes and the lattice's scales are written as they are.
Each packer returns ``[rows, bytes per row]`` uint8 (rows = output channels, blocks along the
inputs), the layout ``gguf.GGUFWriter.add_tensor(raw_dtype=...)`` takes. The tests check every
type against ``gguf.quants.dequantize``.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import WorkbenchError
from .quant.lattice import LATTICES, SUPER_BLOCK, super_block_factor
from .quant.weight import QuantizedWeight


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 values that are float16-exact as their 2 little-endian bytes each, ``[n] -> [n, 2]``."""
    h = x.astype(np.float16)
    if not np.array_equal(h.astype(np.float32), x.astype(np.float32)):
        raise WorkbenchError("a scale is not a float16 value; quantize with the same --format as the export")
    return h.reshape(-1, 1).view(np.uint8).reshape(-1, 2)


def _nibbles(q: np.ndarray, width: int) -> np.ndarray:
    """Values < 16 of ``[n, k * 2 * width]`` packed two per byte: in each chunk of ``2 * width``
    byte i holds value i (low) and value i + width (high)."""
    n = q.shape[0]
    q = q.reshape(n, -1, 2, width)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, -1)


def _crumbs(q: np.ndarray) -> np.ndarray:
    """2-bit values of ``[n, k * 128]``: in each chunk of 128 byte i holds values i + 32 j at bits 2j."""
    n = q.shape[0]
    q = q.reshape(n, -1, 4, 32)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return out.reshape(n, -1)


def _bits_across(bit: np.ndarray, width: int) -> np.ndarray:
    """One bit per value of ``[n, 8 * width]``: byte i holds the bits of values i + width j at bit j."""
    n = bit.shape[0]
    b = bit.reshape(n, 8, width).astype(np.uint8)
    out = np.zeros((n, width), dtype=np.uint8)
    for j in range(8):
        out |= b[:, j] << j
    return out


def _blocks(q: QuantizedWeight, block: int):
    """codes ``[rows * n_blocks, block]`` and the grids ``[rows * n_blocks, sub-blocks per block]``."""
    codes = q.codes.to(torch.int64).numpy().astype(np.uint8)
    rows, cols = codes.shape
    per = block // (cols // q.scale.shape[1])
    scale = q.scale.float().numpy().reshape(-1, per)
    zero = q.zero.float().numpy().reshape(-1, per)
    return codes.reshape(rows * (cols // block), block), scale, zero, rows


def _pack_32(q: QuantizedWeight, name: str) -> np.ndarray:
    lat = LATTICES[name]
    codes, scale, zero, rows = _blocks(q, 32)
    parts = [_f16_bytes(scale[:, 0])]
    if lat.min_offset:
        parts.append(_f16_bytes(-zero[:, 0]))
    if lat.bits == 8:
        parts.append((codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if lat.bits == 5:
            high = ((codes >> 4) & 1).astype(np.uint32)
            qh = np.zeros(codes.shape[0], dtype=np.uint32)
            for i in range(32):
                qh |= high[:, i] << np.uint32(i)
            parts.append(qh.astype("<u4").reshape(-1, 1).view(np.uint8))
        parts.append(_nibbles(codes & 15, 16))
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def _pack_k(q: QuantizedWeight, name: str) -> np.ndarray:
    lat = LATTICES[name]
    codes, scale, zero, rows = _blocks(q, SUPER_BLOCK)
    d, sc = super_block_factor(torch.from_numpy(scale).unsqueeze(0), lat.scale_levels, "scales")
    d, sc = d.numpy().reshape(-1), sc.numpy().reshape(scale.shape).astype(np.uint8)
    if lat.min_offset:
        dmin, mn = super_block_factor(torch.from_numpy(zero).unsqueeze(0), lat.min_levels, "minimums")
        dmin, mn = dmin.numpy().reshape(-1), mn.numpy().reshape(zero.shape).astype(np.uint8)
    if name == "q2_k":
        parts = [sc | (mn << 4), _crumbs(codes), _f16_bytes(d), _f16_bytes(dmin)]
    elif name == "q3_k":
        s = sc + 32                               # stored as signed 6-bit, offset 32
        low = (s[:, :8] & 15) | ((s[:, 8:] & 15) << 4)
        hi = (s >> 4) & 3
        high = hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)
        parts = [_bits_across(codes >> 2, 32), _crumbs(codes & 3), low, high, _f16_bytes(d)]
    elif name in ("q4_k", "q5_k"):
        packed = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                                 (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)
        parts = [_f16_bytes(d), _f16_bytes(dmin), packed]
        if name == "q5_k":
            parts.append(_bits_across((codes >> 4) & 1, 32))
        parts.append(_nibbles(codes & 15, 32))
    else:   # q6_k
        parts = [_nibbles(codes & 15, 64), _crumbs(codes >> 4), sc.astype(np.int8).view(np.uint8), _f16_bytes(d)]
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def pack(q: QuantizedWeight) -> np.ndarray:
    """The tensor's bytes in the layout of its grid's GGUF type, ``[d_out, bytes per row]``."""
    name = q.grid.lattice
    if name is None:
        raise WorkbenchError("the layer was not quantized on a GGUF lattice; quantize with --format gguf:TYPE")
    return (_pack_k if LATTICES[name].super_block else _pack_32)(q.cpu(), name)
