"""Eigen-spectra of the Hessians the solvers see: ``H_in`` per linear layer, ``H_out`` per head.

A solver compensates rounding errors along the directions its Hessian says matter; a few huge
eigenvalues (outlier features) or a large condition number make that compensation fragile.
The statistics are accumulated exactly as the engine does (``InputCovariance``,
``AttentionHessians``) while the calibration data streams through the model block by block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from ..attention_hessians import AttentionHessians
from ..hessians import InputCovariance
from ..models import Family
from .walk import walk_stages

SUMMARY_COLUMNS = ["dim", "trace", "eig_max", "eig_min", "condition", "condition_damped", "effective_rank",
                   "numerical_rank", "top1_share"]
LAYER_COLUMNS = ["name", "block", "kind", "stage"] + SUMMARY_COLUMNS
HEAD_COLUMNS = ["block", "kind", "head", "factor"] + SUMMARY_COLUMNS


def eigenvalues(H: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD matrix ``[..., n, n]``, descending, float64, negatives (noise) at 0."""
    eig = torch.linalg.eigvalsh(H.detach().to("cpu", torch.float64))
    return eig.flip(-1).clamp_min(0.0)


def spectrum_stats(eig: torch.Tensor, damp: float = 0.01) -> dict:
    """Summary of one spectrum (descending, non-negative).

    ``condition``: largest over smallest eigenvalue, the smallest floored at 1e-15 of the largest
    (float64 resolution), so a singular Hessian reads ~1e15 instead of infinity.
    ``condition_damped``: the same after the solver's damping ``damp * mean(diag H)``.
    ``effective_rank``: exp of the entropy of the eigenvalues normalized to sum 1 (Roy & Vetterli):
    n for a flat spectrum, 1 when one direction holds everything.
    ``numerical_rank``: eigenvalues above float32 noise (the statistics are summed in float32).
    ``top1_share``: fraction of the trace held by the largest 1% of the eigenvalues (at least one).
    """
    eig = eig.to(torch.float64)
    n = eig.numel()
    trace = float(eig.sum())
    top = float(eig[0]) if n else 0.0
    low = float(eig[-1]) if n else 0.0
    if top <= 0:
        return dict(dim=n, trace=0.0, eig_max=0.0, eig_min=0.0, condition=float("nan"),
                    condition_damped=float("nan"), effective_rank=0.0, numerical_rank=0, top1_share=float("nan"))
    delta = damp * trace / n
    p = eig / trace
    p = p[p > 0]
    entropy = float(-(p * p.log()).sum())
    tol = top * n * torch.finfo(torch.float32).eps
    k = max(1, math.ceil(0.01 * n))
    return dict(dim=n, trace=trace, eig_max=top, eig_min=low,
                condition=top / max(low, top * 1e-15),
                condition_damped=(top + delta) / (low + delta),
                effective_rank=math.exp(entropy),
                numerical_rank=int((eig > tol).sum()),
                top1_share=float(eig[:k].sum()) / trace)


def _long(eig: torch.Tensor, **keys) -> pd.DataFrame:
    return pd.DataFrame({**{k: [v] * eig.numel() for k, v in keys.items()},
                         "index": range(eig.numel()), "eigenvalue": eig.tolist()})


@dataclass
class Spectra:
    """Frames of one spectra run (all pandas):

    ``layers``: one row per linear layer (``H_in`` of its input; layers reading the same input,
    e.g. q/k/v, share it). ``layer_eigenvalues``: name, block, kind, index, eigenvalue (descending).
    ``heads``: one row per block, kind and head: q/k ``H_out`` (a query head shares its KV head's
    factor under grouped-query attention) and the value projection's per-KV-head ``H_in``.
    ``head_eigenvalues``: block, kind, head, factor, index, eigenvalue.
    """
    layers: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=LAYER_COLUMNS))
    layer_eigenvalues: pd.DataFrame = field(default_factory=pd.DataFrame)
    heads: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=HEAD_COLUMNS))
    head_eigenvalues: pd.DataFrame = field(default_factory=pd.DataFrame)

    def frames(self) -> dict[str, pd.DataFrame]:
        return {"spectra_layers": self.layers, "spectra_layer_eigenvalues": self.layer_eigenvalues,
                "spectra_heads": self.heads, "spectra_head_eigenvalues": self.head_eigenvalues}


@torch.no_grad()
def hessian_spectra(model: nn.Module, family: Family, ids: torch.Tensor, *, batch_size: int = 4,
                    device: torch.device | str = "cpu", max_blocks: int | None = None, heads: bool = True,
                    damp: float = 0.01, on_block=None, cancel=None) -> Spectra:
    """Spectra of every linear layer's ``H_in`` and of the per-head attention factors.

    ``ids`` ``[n, L]``: calibration windows. The model is run as given (full precision or
    already quantized); ``heads=False`` skips the attention-aware factors. ``on_block(b, n)``
    reports progress after each block; ``cancel`` (``is_set()``) stops it between blocks.
    """
    geometry = family.geometry(model.config)
    layer_rows, layer_eigs, head_rows, head_eigs = [], [], [], []
    total = len(family.blocks(model)) if max_blocks is None else min(max_blocks, len(family.blocks(model)))
    for view in walk_stages([model], family, ids, batch_size=batch_size, device=device, max_blocks=max_blocks,
                            on_block=None if on_block is None else (lambda b, _: on_block(b, total)),
                            cancel=cancel):
        stages = view.stages[0]
        cov = InputCovariance(stages[0].x.shape[-1], stages[0].x.device)
        for st in stages:
            cov.add(st.x)
        eig = eigenvalues(cov.H)
        stats = spectrum_stats(eig, damp)
        for kind in view.kinds:
            name = family.layer_name(view.block, kind)
            layer_rows.append({"name": name, "block": view.block, "kind": kind, "stage": ",".join(view.kinds),
                               **stats})
            layer_eigs.append(_long(eig, name=name, block=view.block, kind=kind))
        if heads and view.kinds == family.attention_kinds:
            factors = _attention_factors(family, geometry, view.blocks[0], stages, view.ctx)
            for kind, factor, mats in factors:
                for h, e in enumerate(eigenvalues(mats)):
                    head_rows.append({"block": view.block, "kind": kind, "head": h, "factor": factor,
                                      **spectrum_stats(e, damp)})
                    head_eigs.append(_long(e, block=view.block, kind=kind, head=h, factor=factor))
    out = Spectra()
    if layer_rows:
        out.layers = pd.DataFrame(layer_rows, columns=LAYER_COLUMNS)
        out.layer_eigenvalues = pd.concat(layer_eigs, ignore_index=True)
    if head_rows:
        out.heads = pd.DataFrame(head_rows, columns=HEAD_COLUMNS)
        out.head_eigenvalues = pd.concat(head_eigs, ignore_index=True)
    return out


def _attention_factors(family, geometry, block, stages, ctx):
    """(kind, factor name, [heads, n, n]) for q/k ``H_out`` and the value ``H_in``."""
    attn = family.attention(block)
    x0 = stages[0].x
    acc = AttentionHessians(geometry, x0.shape[1], x0.shape[-1], x0.device)
    for st in stages:
        q, k, _ = family.qkv(attn, st.x, ctx)
        acc.add(st.x.float(), q.float(), k.float(), attn.scaling)
    cos, sin = (None, None) if ctx is None else (ctx[0][0].float(), ctx[1][0].float())
    f = acc.finish(cos, sin)
    return [("q", "H_out", f["q"]["H_out"]), ("k", "H_out", f["k"]["H_out"]), ("v", "H_in", f["v"]["H_in"])]
