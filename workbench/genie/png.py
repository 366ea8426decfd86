"""Images to a PNG grid: Pillow when importable, else a minimal zlib + struct encoder."""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch


def _unit_range(images) -> torch.Tensor:
    """[N, C, H, W] floats, each image stretched to its own min..max in [0, 1]."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] not in (1, 3) or len(x) == 0:
        raise ValueError(f"expected images [N, 1 or 3, H, W], got shape {tuple(x.shape)}")
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp(min=1e-12)


def image_tiles(images, upscale: int = 1) -> list[np.ndarray]:
    """[N, C, H, W] floats -> N uint8 RGB pictures [H * upscale, W * upscale, 3], each stretched to its
    own range as in ``image_grid`` (for galleries that lay images out themselves)."""
    x = _unit_range(images)
    if upscale > 1:
        x = x.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    pixels = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return list(pixels)


def image_grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 1,
               upscale: int = 1) -> np.ndarray:
    """[N, C, H, W] floats -> one uint8 picture [H', W', C] (C is 1 or 3), tiles row-major.

    Each image is stretched to its own min..max, since synthetic images have no fixed range.
    """
    x = _unit_range(images)
    if upscale > 1:
        x = x.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_tiles = math.ceil(n / nrow)
    canvas = torch.ones(c, ncol_tiles * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, k = divmod(i, nrow)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    return (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray) -> bytes:
    """8-bit grayscale [H, W] / [H, W, 1] or RGB [H, W, 3] as PNG bytes (no filtering)."""
    a = np.ascontiguousarray(pixels, dtype=np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    h, w = a.shape[:2]
    color = 0 if a.ndim == 2 else 2
    raw = b"".join(b"\x00" + a[r].tobytes() for r in range(h))   # filter type 0 per scanline
    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def write_png(path: str | Path, pixels: np.ndarray) -> None:
    a = np.asarray(pixels, dtype=np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    try:
        from PIL import Image
    except ImportError:
        Path(path).write_bytes(encode_png(a))
        return
    Image.fromarray(a).save(str(path), format="PNG")
