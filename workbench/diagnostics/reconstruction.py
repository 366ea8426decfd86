"""How far a quantized model's layers and attention drift from full precision on held-out text.

Two readings of every error, both ``||quantized - reference||^2 / ||reference||^2``:

* local (no suffix): the quantized weights applied to the full-precision input of the layer
  (or of the block, for attention). This is the error the layer itself introduces, measured
  on windows the solver never saw; compare it with the report's calibration ``rel_error``.
* ``_propagated``: the quantized model on its own hidden stream, so every earlier layer's
  error is included. This is what the next block actually receives.

Attention is measured per head, before ``o_proj`` (the head's output) and after it (the head's
contribution to the residual stream, ``a_h W_O[:, h]^T``), and per block for all heads together.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from ..errors import WorkbenchError
from ..models import Family
from ..models.base import attend
from .walk import block_count, walk_stages

LAYER_COLUMNS = ["name", "block", "kind", "rel_error", "rel_error_propagated"]
ATTENTION = ["before_o", "after_o", "before_o_propagated", "after_o_propagated"]
HEAD_COLUMNS = ["block", "head"] + ATTENTION
BLOCK_COLUMNS = ["block"] + ATTENTION + ["output_propagated"]


@dataclass
class Reconstruction:
    """``layers``: per linear layer; ``heads``: per block and query head; ``blocks``: per block
    (all heads together, and the block's output hidden state)."""
    layers: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=LAYER_COLUMNS))
    heads: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=HEAD_COLUMNS))
    blocks: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=BLOCK_COLUMNS))

    def frames(self) -> dict[str, pd.DataFrame]:
        return {"error_layers": self.layers, "error_heads": self.heads, "error_blocks": self.blocks}


def frozen_copy(model: nn.Module) -> nn.Module:
    """A full-precision reference to keep before quantizing ``model`` in place."""
    return copy.deepcopy(model).eval()


class _Ratio:
    """Accumulates squared-error and squared-reference sums per key across batches."""

    def __init__(self):
        self.num = defaultdict(float)
        self.den = defaultdict(float)

    def add(self, key, out: torch.Tensor, ref: torch.Tensor, dims=None):
        diff = (out.float() - ref.float()).pow(2)
        r2 = ref.float().pow(2)
        if dims is None:
            self.num[key] += float(diff.sum())
            self.den[key] += float(r2.sum())
        else:   # one value per remaining index (e.g. per head)
            for i, (n, d) in enumerate(zip(diff.sum(dims).tolist(), r2.sum(dims).tolist())):
                self.num[(key, i)] += n
                self.den[(key, i)] += d

    def get(self, key) -> float:
        return self.num[key] / self.den[key] if self.den[key] > 0 else 0.0


def _check_same_shape(fp: nn.Module, quant: nn.Module, family: Family):
    a, b = family.blocks(fp), family.blocks(quant)
    if len(a) != len(b) or fp.config.hidden_size != quant.config.hidden_size:
        raise WorkbenchError("the reference and the quantized model have different shapes; "
                             "compare a model with a quantized copy of itself")


@torch.no_grad()
def reconstruction_errors(fp_model: nn.Module, quant_model: nn.Module, family: Family, ids: torch.Tensor, *,
                          batch_size: int = 4, device: torch.device | str = "cpu",
                          max_blocks: int | None = None, cancel=None, progress=None) -> Reconstruction:
    """Errors of ``quant_model`` against ``fp_model`` on held-out windows ``ids [n, L]``;
    ``cancel`` (``is_set()``) stops it between blocks with ``Cancelled``; ``progress(done, total)`` is
    told the blocks measured, at 0 and after each."""
    _check_same_shape(fp_model, quant_model, family)
    geometry = family.geometry(fp_model.config)
    r = _Ratio()
    layer_keys, block_ids = [], []
    total = block_count(fp_model, family, max_blocks)
    if progress is not None:
        progress(0, total)

    def on_block(b, hidden):
        block_ids.append(b)
        for out_fp, out_q in zip(*hidden):
            r.add(("output_propagated", b), out_q, out_fp)
        if progress is not None:
            progress(len(block_ids), total)

    for view in walk_stages([fp_model, quant_model], family, ids, batch_size=batch_size, device=device,
                            max_blocks=max_blocks, on_block=on_block, cancel=cancel):
        b = view.block
        fp_block, q_block = view.blocks
        for kind in view.kinds:
            layer_keys.append((b, kind))
            fp_lin, q_lin = family.linear(fp_block, kind), family.linear(q_block, kind)
            for st_fp, st_q in zip(*view.stages):
                ref = fp_lin(st_fp.x)
                r.add(("local", b, kind), q_lin(st_fp.x), ref)
                r.add(("propagated", b, kind), q_lin(st_q.x), ref)
        if view.kinds == family.attention_kinds:
            _attention(r, family, geometry, b, fp_block, q_block, view)
    layers = [{"name": family.layer_name(b, k), "block": b, "kind": k, "rel_error": r.get(("local", b, k)),
               "rel_error_propagated": r.get(("propagated", b, k))} for b, k in layer_keys]
    heads = [{"block": b, "head": h, **{c: r.get(((c, b), h)) for c in ATTENTION}}
             for b in block_ids for h in range(geometry.n_heads)]
    blocks = [{"block": b, **{c: r.get((c, b, "all")) for c in ATTENTION},
               "output_propagated": r.get(("output_propagated", b))} for b in block_ids]
    return Reconstruction(pd.DataFrame(layers, columns=LAYER_COLUMNS), pd.DataFrame(heads, columns=HEAD_COLUMNS),
                          pd.DataFrame(blocks, columns=BLOCK_COLUMNS))


def _attention(r: _Ratio, family, geometry, b, fp_block, q_block, view):
    """Per-head and whole-block attention errors, before and after ``o_proj``."""
    fp_attn, q_attn = family.attention(fp_block), family.attention(q_block)
    d, H = geometry.head_dim, geometry.n_heads
    Wo_fp = family.linear(fp_block, "o").weight
    Wo_q = family.linear(q_block, "o").weight
    o_fp, o_q = family.linear(fp_block, "o"), family.linear(q_block, "o")
    for st_fp, st_q in zip(*view.stages):
        ref = attend(*family.qkv(fp_attn, st_fp.x, view.ctx), fp_attn.scaling)          # [b, L, H*d]
        outs = {"": attend(*family.qkv(q_attn, st_fp.x, view.ctx), q_attn.scaling),
                "_propagated": attend(*family.qkv(q_attn, st_q.x, view.ctx), q_attn.scaling)}
        ref_h = ref.unflatten(-1, (H, d))
        ref_o = o_fp(ref)
        for suffix, out in outs.items():
            out_h = out.unflatten(-1, (H, d))
            r.add((f"before_o{suffix}", b), out_h, ref_h, dims=(0, 1, 3))
            r.add((f"before_o{suffix}", b, "all"), out, ref)
            r.add((f"after_o{suffix}", b, "all"), o_q(out), ref_o)
            for h in range(H):   # a head's share of the o_proj output, one head at a time to bound memory
                cols = slice(h * d, (h + 1) * d)
                r.add(((f"after_o{suffix}", b), h), out_h[..., h, :] @ Wo_q[:, cols].T,
                      ref_h[..., h, :] @ Wo_fp[:, cols].T)
