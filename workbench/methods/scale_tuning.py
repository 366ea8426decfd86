"""Tuning of the group scales, with the integer codes fixed: block by block after each block is solved,
then end to end (``train_end_to_end``) after the last.

The stage-wise solvers fit each layer to its own objective; what the next block reads is the
block's output. Once a block's layers are on their grids, this tunes every group's scale of every
linear of the block (``W_hat = s exp(u) (c - z)``, ``u`` learned, the codes ``c`` and zero points
``z`` kept) by Adam on the block's output error against the full-precision block on the
full-precision stream (the target of TurboBoA's inherited-error correction):
``||f_q(h~) - f(h)||^2 / ||f(h) - h||^2``, one calibration window per step. There are no rounding
variables, so a step is one forward and backward pass of the block on one window, and the
result packs like any solver's. A tuned block that ends worse on the whole calibration set than
it started keeps its solved scales.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..engine import BlockJob, BlockQuantizer
from ..errors import WorkbenchError
from ..hessians import relative_error
from ..quant.lattice import lattice, place_scales
from ..quant.weight import QuantizedWeight
from ..transformed import linear_through
from .brecq import run_block, swap_linear


@dataclass(frozen=True)
class ScaleTuning:
    # On the first 8 blocks of SmolLM2-135M at W2 g64 (32x512 calibration, 16 windows, fp 36.64, damp
    # 0.1): TurboBoA 54.62; tuned 20 steps of 4 windows 50.79, 40 steps of one window 51.18 in 2.9 s a block
    steps: int = 40
    lr: float = 5e-3               # Adam on u = log(scale / solved scale)
    windows: int = 1               # calibration windows per step
    norms: bool = False            # also tune the block's other parameters (its norms' weights), kept in float
    # then steps of every scale on the model's loss, one window each. After the 8 blocks above: 32 steps at lr 2e-3
    # 45.66, at 5e-3 44.48, 64 steps at 5e-3 44.17; about 1.9 s a step on the whole model (2-core CPU)
    e2e_steps: int = 48
    e2e_lr: float = 5e-3
    seed: int = 0                  # order of the windows

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 0:
            raise WorkbenchError(f"tuning steps must be a whole number, 0 or more, got {self.steps!r}")
        if not isinstance(self.e2e_steps, int) or self.e2e_steps < 0:
            raise WorkbenchError(f"end-to-end steps must be a whole number, 0 or more, got {self.e2e_steps!r}")
        if not (self.lr > 0 and self.e2e_lr > 0):
            raise WorkbenchError(f"the tuning learning rates must be above 0, got {self.lr!r} and {self.e2e_lr!r}")


class TunedScales(nn.Module):
    """Stands in for a quantized ``nn.Linear`` while its scales are tuned: ``s exp(u) (c - z)`` per group
    (``s exp(u) c - m`` on a GGUF lattice with a stored minimum)."""

    def __init__(self, linear: nn.Linear, q: QuantizedWeight):
        super().__init__()
        self.linear, self.q = linear, q
        d_out, d_in = q.codes.shape
        groups = q.scale.shape[-1]
        codes = q.codes.float().reshape(d_out, groups, d_in // groups).to(linear.weight.device)
        zero = q.zero.float().unsqueeze(-1).to(codes.device)
        self.min_offset = q.grid.min_offset
        self.centred = codes if self.min_offset else codes - zero
        self.offset = zero if self.min_offset else None
        self.scale = q.scale.float().to(codes.device)
        self.u = nn.Parameter(torch.zeros_like(self.scale))

    def weight(self) -> torch.Tensor:
        W = (self.scale * self.u.exp()).unsqueeze(-1) * self.centred
        if self.offset is not None:
            W = W - self.offset
        return W.reshape(self.linear.weight.shape)

    def forward(self, x):
        return linear_through(self.linear, x, self.weight().to(x.dtype))

    def tuned(self) -> QuantizedWeight:
        scale = (self.scale * self.u.detach().exp()).cpu()
        if self.q.grid.lattice is not None:     # back onto the scales the file can hold
            scale = place_scales(scale, lattice(self.q.grid.lattice))
        return dataclasses.replace(self.q, scale=scale.to(self.q.scale.dtype))


def tuned_stages(engine: BlockQuantizer, job: BlockJob):
    """The block strategy: the stage-wise solve, then the scales tuned on the block's output."""
    outs, outs_fp = engine.quantize_stages(job)
    opts = ScaleTuning(**engine.options.get("tuning", {}))
    if opts.steps == 0 or not engine.block_layers:
        return outs, outs_fp
    return tune_scales(engine, job, outs, outs_fp, opts), outs_fp


def tune_scales(engine: BlockQuantizer, job: BlockJob, outs: list[torch.Tensor], outs_fp: list[torch.Tensor],
                opts: ScaleTuning):
    """Tunes the scales of the block's quantized linears (``engine.block_layers``) in place: the block's
    weights, the packed layers and their records. ``outs``: the solved block's outputs on the quantized
    stream; returns the tuned block's (or ``outs``, when tuning did not lower the loss)."""
    t0 = time.perf_counter()
    fam, b, block, ctx, dev = engine.family, job.index, job.block, job.ctx, engine.device
    engine.emit(kind="phase", block=b, message=f"block {b}: tuning the scales on the block's output")

    def windows(hidden):
        return [w for h in hidden for w in h.to(dev).split(opts.windows)]
    inputs, targets, sources = windows(job.hidden), windows(outs_fp), windows(job.hidden_fp)
    sizes = [float((t - h).pow(2).sum()) or 1.0 for t, h in zip(targets, sources)]   # of each window's update
    del sources
    kinds = {fam.layer_name(b, k): k for k in fam.linears}
    tuned = {name: TunedScales(fam.linear(block, kinds[name]), engine.result.packed[name])
             for name in engine.block_layers}
    params = list(block.parameters())         # the block's own: frozen while the scales learn
    grads = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    paths = tuple(fam.linears[k] + "." for k in fam.linears)
    others = [p for n, p in block.named_parameters() if not n.startswith(paths)] if opts.norms else []
    kept_others = [p.data.clone() for p in others]
    for p in others:
        p.requires_grad_(True)
    for name, module in tuned.items():
        swap_linear(fam, block, kinds[name], module)
    order = torch.Generator().manual_seed(opts.seed + b)

    def loss(i):
        return (run_block(fam, block, inputs[i], ctx) - targets[i]).pow(2).sum() / sizes[i]

    def mean_loss(outputs):
        ends = windows(outputs)
        return sum(float((o - t).pow(2).sum()) / n for o, t, n in zip(ends, targets, sizes)) / len(ends)
    before = mean_loss(outs)
    try:
        optimizer = torch.optim.Adam([m.u for m in tuned.values()] + others, lr=opts.lr)
        with torch.enable_grad():
            for _ in range(opts.steps):
                engine.check_cancel()
                optimizer.zero_grad(set_to_none=True)
                loss(int(torch.randint(len(inputs), (1,), generator=order))).backward()
                optimizer.step()
    finally:
        for name, module in tuned.items():
            swap_linear(fam, block, kinds[name], module.linear)
        for p, g in zip(params, grads):
            p.requires_grad_(g)
    # the tuned weights as they will be stored (on a GGUF lattice's scales), measured on every window
    candidates = {name: module.tuned() for name, module in tuned.items()}
    solved = {name: module.linear.weight.data for name, module in tuned.items()}
    for name, q in candidates.items():
        layer = tuned[name].linear
        layer.weight.data = q.dequantize().to(layer.weight.device, layer.weight.dtype)
    with torch.no_grad():
        tuned_outs = [run_block(fam, block, h.to(dev), ctx).cpu() for h in job.hidden]
    after = mean_loss(tuned_outs)
    kept = after < before
    if not kept:
        for p, value in zip(others, kept_others):
            p.data.copy_(value)
    for name, q in candidates.items():
        rec, W32, H = engine.block_layers[name]
        rec.extra.update(block_loss_solved=before, block_loss_tuned=after, tuning_kept=kept)
        if not kept:
            tuned[name].linear.weight.data = solved[name]
            continue
        engine.result.packed[name] = q
        rec.extra["rel_error_solved"] = rec.rel_error
        rec.rel_error = relative_error(q.dequantize().to(W32.device) - W32, W32, H)
    engine.result.timings["tuning"] = engine.result.timings.get("tuning", 0.0) + time.perf_counter() - t0
    return tuned_outs if kept else outs


def train_end_to_end(model: nn.Module, packed: dict[str, QuantizedWeight], ids: torch.Tensor, opts: ScaleTuning,
                     device, progress=None, check_cancel=None) -> dict:
    """Every quantized layer's group scales trained together on the model's next-token loss over the
    calibration windows (one window a step, codes and zero points kept), after the block-wise pass: the
    loss perplexity measures, where the block-wise losses stop at each block's output. ``packed`` and the
    model's weights are updated in place; returns what the report keeps (steps, the mean loss of the
    first and last steps)."""
    if opts.e2e_steps == 0 or not packed:
        return {}
    modules = dict(model.named_modules())
    params = list(model.parameters())
    grads = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    home = next(model.parameters()).device
    model.to(device)
    tuned = {}
    for name, q in packed.items():
        parent, _, attr = name.rpartition(".")
        tuned[name] = TunedScales(modules[name], q)
        setattr(modules[parent] if parent else model, attr, tuned[name])
    order = torch.Generator().manual_seed(opts.seed)
    losses = []
    try:
        optimizer = torch.optim.Adam([m.u for m in tuned.values()], lr=opts.e2e_lr)
        if progress is not None:
            progress(0, opts.e2e_steps)
        with torch.enable_grad():
            for step in range(opts.e2e_steps):
                if check_cancel is not None:
                    check_cancel()
                x = ids[int(torch.randint(ids.shape[0], (1,), generator=order))].unsqueeze(0).to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = model(x, labels=x, use_cache=False).loss
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(step + 1, opts.e2e_steps)
    finally:
        for name, module in tuned.items():
            parent, _, attr = name.rpartition(".")
            setattr(modules[parent] if parent else model, attr, module.linear)
        for p, g in zip(params, grads):
            p.requires_grad_(g)
    for name, module in tuned.items():
        q = packed[name] = module.tuned()
        layer = module.linear
        layer.weight.data = q.dequantize().to(layer.weight.device, layer.weight.dtype)
    model.to(home)
    tenth = max(1, len(losses) // 10)
    return {"steps": len(losses), "lr": opts.e2e_lr, "loss_first_steps": sum(losses[:tenth]) / tenth,
            "loss_last_steps": sum(losses[-tenth:]) / tenth}
