"""How many bytes a quantized linear takes as the pack-quantized export stores it.

compressed-tensors packs densely into int32 words (``pack_to_int32``): the codes of each output row
along the row (``ceil(d_in * b / 32)`` words), the zero points of each group along the output
rows (``ceil(d_out * b / 32)`` words per group, asymmetric grids only); the scales are one float16
per row and group, and ``weight_shape`` two int64. The sum is what ``export.json`` counts as a
layer's ``quantized_bytes``, so a budget in these bytes is the checkpoint's, not an estimate.
"""
from __future__ import annotations

import math

WORD_BYTES = 4            # int32 words of the packed codes and zero points
SCALE_BYTES = 2           # float16 scales: the export's default dtype
SHAPE_BYTES = 16          # weight_shape: two int64
MB = 10 ** 6              # the unit of --max-size


def packed_bytes(d_out: int, d_in: int, bits: int, group_size: int, symmetric: bool,
                 scale_bytes: int = SCALE_BYTES) -> int:
    """Bytes of one ``d_out x d_in`` linear at ``bits`` with groups of ``group_size`` (-1: per row)."""
    groups = 1 if group_size == -1 else d_in // group_size
    codes = WORD_BYTES * d_out * math.ceil(d_in * bits / 32)
    zeros = 0 if symmetric else WORD_BYTES * math.ceil(d_out * bits / 32) * groups
    return codes + zeros + scale_bytes * d_out * groups + SHAPE_BYTES


def average_bits(total_bytes: int, weights: int) -> float:
    """Bits per weight of ``weights`` weights stored in ``total_bytes``."""
    return 8.0 * total_bytes / weights if weights else 0.0
