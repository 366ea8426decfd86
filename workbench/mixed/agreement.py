"""Which sensitivity signal ranks the layers as the model does: each against the measured damage.

For a handful of layers, only that layer is rounded to its lowest candidate width (round to nearest
on the run's grid, the error the signals price) and the perplexity on a few windows is measured; a
signal is as good as the Spearman rank correlation of its costs with those perplexity rises. The
allocation only compares costs, so the ranks are what matter, not the scale. ``compare_signals`` does
it for the layers of a model's first blocks (``benchmarks/mixed.py`` prints it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..evaluate import loss_sums
from ..quant.grid import GridConfig, rtn
from .plan import run_layers
from .sensitivity import SIGNALS
from .setup import measure_costs


@dataclass
class Agreement:
    ppl_fp: float
    bits: int                                   # the width each layer was rounded to alone
    ppl_rise: dict[str, float]                  # layer -> perplexity with that layer alone quantized, minus fp
    costs: dict[str, dict[str, float]]          # signal -> layer -> cost at that width
    spearman: dict[str, float]                  # signal -> rank correlation with ``ppl_rise``


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (the Pearson correlation of the ranks); NaN when either side is constant."""
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def _perplexity(model, windows, device, batch_size) -> float:
    total, count = loss_sums(model, windows, device, batch_size)
    return math.exp(total / count)


@torch.no_grad()
def measure_agreement(model, names: list[str], windows: torch.Tensor, grid: GridConfig,
                      costs: dict[str, dict[str, float]], device, batch_size: int = 4, progress=None) -> Agreement:
    """The perplexity rise of each layer in ``names`` alone on ``grid`` and each signal's rank agreement
    with it; ``costs``: signal -> layer -> cost on that grid."""
    base = _perplexity(model, windows, device, batch_size)
    rise = {}
    for i, name in enumerate(names):
        if progress is not None:
            progress(i, len(names))
        layer = model.get_submodule(name)
        kept = layer.weight.data
        layer.weight.data = rtn(kept.float(), grid).to(kept.dtype)
        try:
            rise[name] = _perplexity(model, windows, device, batch_size) - base
        finally:
            layer.weight.data = kept
    if progress is not None:
        progress(len(names), len(names))
    measured = [rise[n] for n in names]
    picked = {s: {n: c[n] for n in names} for s, c in costs.items()}
    return Agreement(base, grid.bits, rise, picked,
                     {s: spearman([c[n] for n in names], measured) for s, c in picked.items()})


def compare_signals(model, family, cfg, ids: torch.Tensor, windows: torch.Tensor, blocks: int, device) -> Agreement:
    """Every signal against the perplexity rise of each layer of the first ``blocks`` blocks alone at the
    lowest of ``cfg``'s candidate widths, on the run's grid (``ids``: calibration, ``windows``: evaluation)."""
    layers = run_layers(model, family, blocks, cfg.ignore)
    costs = measure_costs(model, family, layers, ids, cfg, device, SIGNALS)
    low = min(cfg.candidates())
    grid = dataclasses.replace(cfg.grid(), bits=low)
    return measure_agreement(model, [l.name for l in layers], windows, grid,
                             {s: {n: c[low] for n, c in by_layer.items()} for s, by_layer in costs.items()},
                             device, cfg.batch_size)
