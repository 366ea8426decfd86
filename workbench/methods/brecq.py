"""BRECQ-style block reconstruction: the block-wise baseline for aespa.

The rounding of every linear of a transformer block is learned jointly (the shared optimizer of
``quant.rounding``, round-to-nearest start) by backpropagating the block's output error through
the whole block on the calibration data. The inputs are the hidden states of the quantized
model so far; the targets are the full-precision block's outputs on those same inputs. The
loss is the relative error of the block's residual update, ``||f_q(h) - f(h)||^2 / ||f(h) - h||^2``
(the residual stream itself would make any error look tiny next to the regularizer). Each step
runs one calibration micro-batch forward and backward through the block.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..engine import BlockJob, BlockQuantizer
from ..hessians import InputCovariance
from ..models.base import get_path
from ..quant.rounding import LearnedRounding, optimize_rounding
from ..transformed import linear_through, prepare, quantizes_activations
from .learned import LearnedOptions


class SoftLinear(nn.Module):
    """Stands in for an ``nn.Linear`` while its rounding is learned: the weight comes from the rounder."""

    def __init__(self, linear: nn.Linear, rounder: LearnedRounding):
        super().__init__()
        self.linear, self.rounder = linear, rounder

    def forward(self, x):
        return linear_through(self.linear, x, self.rounder().to(x.dtype))


def run_block(family, block, h, ctx, covs: dict | None = None, stages: dict | None = None):
    """The block's output for ``h``; with ``covs``, accumulates each stage's input covariance (of the input its
    linears' matmuls see); with ``stages``, collects each stage by its kinds."""
    gen = family.block_forward(block, h, ctx)
    while True:
        try:
            stage = next(gen)
        except StopIteration as stop:
            return stop.value
        if stages is not None:
            stages.setdefault(stage.kinds, []).append(stage)
        if covs is not None:
            if stage.kinds not in covs:
                covs[stage.kinds] = InputCovariance(stage.x.shape[-1], stage.x.device)
            covs[stage.kinds].add(prepare(family.linear(block, stage.kinds[0]), stage.x))


def brecq_block(engine: BlockQuantizer, job: BlockJob):
    """BRECQ's block strategy: one rounding optimization for all linears of the block; the
    records, events and packed layers are the engine's, as for a stage-wise method."""
    dev, fam, b, block, ctx = engine.device, engine.family, job.index, job.block, job.ctx
    opts = LearnedOptions(**engine.options.get("learned", {}))
    kinds = [k for k in fam.linears if engine.quantizes(b, k)]
    inputs = [h.to(dev) for h in job.hidden]
    if not kinds:    # the whole block stays in full precision
        return [run_block(fam, block, h, ctx).cpu() for h in inputs], None

    t0 = time.perf_counter()
    act = _quantize_activations(engine, block, kinds, inputs, ctx)
    covs: dict = {}
    targets = [run_block(fam, block, h, ctx, covs) for h in inputs]
    norms = [float((t - h).pow(2).sum()) or 1.0 for t, h in zip(targets, inputs)]
    H = {k: cov.H for stage, cov in covs.items() for k in stage}
    t0 = engine.tick("forward", t0)

    layers = {k: fam.linear(block, k) for k in kinds}
    fp_weights = {k: l.weight.data.float().clone() for k, l in layers.items()}
    rounders = {k: LearnedRounding(l.weight.data, engine.grid_of(b, k), column_weight=H[k].diagonal())
                for k, l in layers.items()}
    params = list(block.parameters())            # the block's own: frozen while the rounding learns
    grads = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    for k in kinds:
        swap_linear(fam, block, k, SoftLinear(layers[k], rounders[k]))
    order = torch.Generator().manual_seed(opts.seed + b)

    def batch_loss(i):
        out = run_block(fam, block, inputs[i], ctx)
        return (out - targets[i]).pow(2).sum() / norms[i]

    def full_loss():
        return sum(float(batch_loss(i)) for i in range(len(inputs))) / len(inputs)

    def step_loss():
        return batch_loss(int(torch.randint(len(inputs), (1,), generator=order)))

    engine.emit(kind="layer_started", block=b, layer=fam.layer_name(b, kinds[0]), layer_kind=kinds[0])
    try:
        for r in rounders.values():
            r.hard = True
        t1 = time.perf_counter()
        before = full_loss()
        t0 += engine.tick("measure", t1) - t1     # measuring is not quantizing (as in the engine)
        hist = optimize_rounding(list(rounders.values()), step_loss, opts.rounding(),
                                 callback=lambda step, value: engine.check_cancel())
        t1 = time.perf_counter()
        after = full_loss()
        t0 += engine.tick("measure", t1) - t1
    finally:
        for k in kinds:
            swap_linear(fam, block, k, layers[k])
        for p, g in zip(params, grads):
            p.requires_grad_(g)
    seconds = time.perf_counter() - t0
    engine.result.timings["solve"] += seconds

    for k in kinds:
        q = rounders[k].result()
        dW = q.dequantize() - fp_weights[k]
        record = engine.record(block, b, k, q, fp_weights[k], H[k], float(((dW @ H[k]) * dW).sum()),
                               seconds / len(kinds),
                               {**act.get(k, {}), "block_loss_before": before, "block_loss_after": after,
                                "final_step_loss": hist.final_loss, "iters": opts.iters, "block_seconds": seconds})
        if k != kinds[0]:
            engine.emit(kind="layer_started", block=b, layer=record.name, layer_kind=k)
        engine.emit_finished(record)

    t0 = time.perf_counter()
    outs = [run_block(fam, block, h, ctx).cpu() for h in inputs]
    engine.tick("forward", t0)
    return outs, None


def _quantize_activations(engine: BlockQuantizer, block, kinds, inputs, ctx) -> dict:
    """The engine's activation clip and error per stage (see ``BlockQuantizer.quantize_activations``), from
    one pass over the measure batches; by kind."""
    if not quantizes_activations(block):
        return {}
    seen: dict = {}
    for h in inputs[:max(1, engine.options.get("measure_batches", 2))]:
        run_block(engine.family, block, h, ctx, stages=seen)
    out = {}
    for stage_kinds, stages in seen.items():
        todo = [k for k in stage_kinds if k in kinds]
        if todo:
            found = engine.quantize_activations(block, todo, stages)
            out.update({k: found for k in todo})
    return out


def swap_linear(family, block, kind, module):
    path = family.linears[kind]
    parent, _, name = path.rpartition(".")
    setattr(get_path(block, parent) if parent else block, name, module)
