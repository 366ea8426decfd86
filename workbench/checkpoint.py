"""``workbench.load_quantized``: any quantized model the workbench writes, read back."""
from __future__ import annotations

import os

import torch

from . import export, export_gguf


def load_quantized(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> export.QuantizedCheckpoint:
    """A pack-quantized checkpoint directory (codes and grids in ``packed``), or a ``.gguf`` file or
    the directory ``--format gguf:TYPE`` wrote (the dequantized model)."""
    if export_gguf.is_gguf(path):
        return export_gguf.load_gguf(path, dtype)
    return export.load_quantized(path, dtype)
