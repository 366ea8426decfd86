"""Block-by-block sequential quantization.

Block i+1 is calibrated on the outputs of the already-quantized block i. Inside a block the
stages run in order (q/k/v, o, gate/up, down): each stage's statistics are accumulated batch
by batch from inputs that already went through the quantized earlier layers, so one forward
pass per block serves every layer. Only the block being worked on sits on the device.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from .attention_hessians import AttentionHessians
from .devices import resolve_device  # noqa: F401  (the engine's callers import it from here)
from .distributed import SINGLE, Ranks
from .errors import Cancelled, WorkbenchError
from .hessians import InputCovariance, relative_error
from .models import Family, Stage
from .models.base import attend
from .patterns import matches
from .quant.activation import relative_error as activation_error
from .quant.activation import search_clip
from .quant.grid import GridConfig
from .quant.solver import SolveResult, SolverConfig, SolverError
from .quant.weight import QuantizedWeight
from .report import LayerRecord
from .transformed import TransformedLinear, full_precision_copy, online_only, prepare


@dataclass
class Event:
    kind: str                   # "phase", "start", "layer_started", "layer_finished", "block_finished", "done",
                                # "progress" (a measured phase: ``workbench.progress``)
    index: int = 0              # layers (or blocks, for walks) finished so far
    total: int = 0              # layers (or blocks) in the run
    block: int | None = None
    layer: str | None = None
    layer_kind: str | None = None
    loss: float | None = None
    rel_error: float | None = None
    seconds: float | None = None
    message: str | None = None  # "phase": what the run is doing now; "progress": the phase
    unit: str | None = None     # "progress": what ``index`` and ``total`` count (window, block, layer)


@dataclass
class EngineResult:
    layers: list[LayerRecord] = field(default_factory=list)
    packed: dict[str, QuantizedWeight] = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


@dataclass
class LayerProblem:
    """What a method's layer strategy is given: one weight, the statistics of its stage, the settings."""
    W: torch.Tensor
    H: torch.Tensor                 # the stage's input covariance E[x x^T]
    stats: dict                     # attention-aware factors ``H_in``/``H_out`` of q/k/v, when asked for
    cross: torch.Tensor | None      # E[dX X~^T] against the full-precision stream, when it runs
    kind: str
    grid: GridConfig
    solver: SolverConfig
    options: dict
    check_cancel: Callable[[], None]


@dataclass
class BlockJob:
    """What a method's block strategy is given: block ``b`` on the device and its input streams."""
    index: int
    block: nn.Module
    fp_block: nn.Module | None      # a full-precision copy, when the method runs the fp stream
    hidden: list[torch.Tensor]      # per micro-batch, on the CPU
    hidden_fp: list[torch.Tensor] | None
    ctx: object                     # the family's per-sequence context (RoPE tables), on the device


class Method(Protocol):
    """What the engine reads of a method (``workbench.methods.MethodSpec`` is one)."""
    name: str
    attention_aware: bool           # q/k/v get attention-aware Kronecker factors
    fp_stream: bool                 # the full-precision model runs beside the quantized one
    tunes_scales: bool              # a block's layers are kept after the solve, for its strategy to tune
    layer: Callable[[LayerProblem], SolveResult] | None        # quantizes one layer of a stage
    block: Callable[["BlockQuantizer", BlockJob], tuple] | None  # replaces the stage-wise walk of a block


class _Catch(Exception):
    pass


class _InputCatcher(nn.Module):
    """Stands in for block 0 to capture its input hidden states, then stops the forward."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        self.captured = None

    def forward(self, hidden_states, *args, **kwargs):
        self.captured = hidden_states
        raise _Catch


@torch.no_grad()
def block_inputs(model: nn.Module, family: Family, ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Hidden states entering the first block, one tensor per micro-batch (on the model's device)."""
    blocks = family.blocks(model)
    catcher = _InputCatcher(blocks[0])
    blocks[0] = catcher
    out = []
    try:
        for i in range(0, ids.shape[0], batch_size):
            try:
                model(ids[i:i + batch_size], use_cache=False)
            except _Catch:
                out.append(catcher.captured)
    finally:
        blocks[0] = catcher.block
    return out


class ResidentBlocks:
    """Where an in-memory model's blocks come from: the model itself, each block moved to the device for
    its turn and back. (``offload.DiskBlocks`` reads them from the checkpoint instead.)"""

    def __init__(self, model: nn.Module, family: Family):
        self.blocks = family.blocks(model)

    def fetch(self, b: int, device: torch.device) -> nn.Module:
        return self.blocks[b].to(device)

    def finish(self, b: int, block: nn.Module):
        self.blocks[b] = block.cpu()


def to_device(ctx, device):
    """A tensor, or nested tuples of them (the family's context), on ``device``."""
    if ctx is None:
        return None
    if isinstance(ctx, torch.Tensor):
        return ctx.to(device)
    return type(ctx)(to_device(c, device) for c in ctx)


class BlockQuantizer:
    """Runs a method over the blocks of a model; emits events; can be cancelled between layers.

    The walk is the same for every method: a block's stages in order, each stage's statistics
    (the ones the method asks for), then the method's ``layer`` strategy on each of its linears.
    A method with a ``block`` strategy takes the whole block instead (block-wise reconstruction).
    Each layer is quantized on its own grid (``grid_of``): the run's, at the width a mixed-precision
    ``plan`` gives it.
    """

    def __init__(self, model: nn.Module, family: Family, method: Method, grid: GridConfig,
                 solver: SolverConfig, device: torch.device, batch_size: int = 4,
                 max_blocks: int | None = None, on_event: Callable[[Event], None] | None = None,
                 cancel=None, options: dict | None = None, ranks: Ranks = SINGLE, store=None, activations=None,
                 packed=None, plan: dict[str, int] | None = None):
        self.model, self.family, self.method, self.grid, self.solver = model, family, method, grid, solver
        self.plan = plan          # mixed precision: layer name -> width (``grid``'s group size, symmetry and search)
        # where blocks come from and go (None: the model's own, ``ResidentBlocks``); the pool that holds the
        # hidden states between blocks (an ``activations.ActivationPool``; None: plain lists); and the
        # mapping the quantized layers go to (None: a dict in memory)
        self.store, self.activations = store, activations
        self.ranks = ranks        # data-parallel calibration: ``ids`` given to ``run`` are this rank's share
        self.device, self.batch_size, self.max_blocks = device, batch_size, max_blocks
        self.on_event, self.cancel, self.options = on_event, cancel, options or {}
        self.geometry = family.geometry(model.config)
        self.result = EngineResult(timings={"forward": 0.0, "statistics": 0.0, "solve": 0.0, "solve_qkv": 0.0,
                                            "measure": 0.0})
        if packed is not None:
            self.result.packed = packed
        self.done = 0
        self.total = 0
        # the layers recorded in the block being quantized: name -> (record, full-precision weight, H), kept only
        # for a method that changes them after the solve (``methods.scale_tuning``): they hold a block's weights
        self.block_layers: dict[str, tuple[LayerRecord, torch.Tensor, torch.Tensor]] = {}

    # -- events, cancel, clocks: what block strategies use too ------------------------------------
    def emit(self, **kw):
        if self.on_event is not None:
            self.on_event(Event(index=self.done, total=self.total, **kw))

    def check_cancel(self):
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("run cancelled")

    def tick(self, key: str, t0: float) -> float:
        """Add the time since ``t0`` to phase ``key``; returns now."""
        t = time.perf_counter()
        self.result.timings[key] += t - t0
        return t

    def record(self, block: nn.Module, b: int, kind: str, quantized: QuantizedWeight, W: torch.Tensor,
               H: torch.Tensor, loss: float, seconds: float, extra: dict | None = None) -> LayerRecord:
        """Put ``quantized`` into ``block`` in place of ``W`` (its ``kind`` linear) and record the layer."""
        layer = self.family.linear(block, kind)
        name = self.family.layer_name(b, kind)
        W32 = W.float()
        Q = quantized.dequantize()
        rel = relative_error(Q - W32, W32, H)
        layer.weight.data = Q.to(layer.weight.dtype)
        self.result.packed[name] = quantized.cpu()
        extra = dict(extra or {})
        if self.plan is not None:
            extra["bits"] = quantized.grid.bits
        rec = LayerRecord(name=name, block=b, kind=kind, loss=loss, rel_error=rel, seconds=seconds, extra=extra)
        self.result.layers.append(rec)
        if getattr(self.method, "tunes_scales", False):
            self.block_layers[name] = (rec, W32, H)
        self.done += 1
        return rec

    def grid_of(self, b: int, kind: str) -> GridConfig:
        """The grid of one layer: the run's, at the width the plan gives the layer."""
        if self.plan is None:
            return self.grid
        return dataclasses.replace(self.grid, bits=self.plan[self.family.layer_name(b, kind)])

    def quantizes(self, b: int, kind: str) -> bool:
        """False for a layer the run leaves in full precision (``options["ignore"]`` patterns)."""
        return not matches(self.family.layer_name(b, kind), self.options.get("ignore", ()))

    def emit_finished(self, record: LayerRecord):
        self.emit(kind="layer_finished", block=record.block, layer=record.name, layer_kind=record.kind,
                  loss=record.loss, rel_error=record.rel_error, seconds=record.seconds)

    # -- the walk -----------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, ids: torch.Tensor) -> EngineResult:
        blocks = self.family.blocks(self.model)
        n_blocks = len(blocks) if self.max_blocks is None else min(self.max_blocks, len(blocks))
        self.total = sum(self.quantizes(b, k) for b in range(n_blocks) for k in self.family.linears)
        self.emit(kind="start")
        t0 = time.perf_counter()
        store = self.store or ResidentBlocks(self.model, self.family)
        hidden = self.keep([h.cpu() for h in block_inputs(self.model, self.family, ids, self.batch_size)])
        ctx = to_device(self.family.context(self.model, hidden[0]), self.device)
        hidden_fp = self.keep([h.clone() for h in hidden]) if self.method.fp_stream else None
        t0 = self.tick("forward", t0)
        strategy = self.method.block or BlockQuantizer.quantize_stages
        for b in range(n_blocks):
            block = store.fetch(b, self.device)
            fp_block = full_precision_copy(block) if hidden_fp is not None else None
            self.block_layers = {}
            hidden, hidden_fp = strategy(self, BlockJob(b, block, fp_block, hidden, hidden_fp, ctx))
            hidden, hidden_fp = self.keep(hidden), self.keep(hidden_fp)
            store.finish(b, block)
            del block, fp_block     # before the next block is fetched: one block in memory at a time
            self.block_layers = {}
            self.emit(kind="block_finished", block=b)
        self.emit(kind="done")
        return self.result

    def keep(self, hidden: list | None):
        """Hidden states between blocks, held by the run's activation pool when it has one."""
        return hidden if self.activations is None or hidden is None else self.activations.hold(hidden)

    def quantize_stages(self, job: BlockJob):
        """The stage-wise strategy: one forward pass of the block, pausing before each stage."""
        dev = self.device
        gens = [self.family.block_forward(job.block, h.to(dev), job.ctx) for h in job.hidden]
        gens_fp = None if job.fp_block is None else [self.family.block_forward(job.fp_block, h.to(dev), job.ctx)
                                                     for h in job.hidden_fp]
        t0 = time.perf_counter()
        stages, outs = advance_stages(gens)
        stages_fp, outs_fp = advance_stages(gens_fp) if gens_fp else (None, None)
        self.tick("forward", t0)
        while stages is not None:
            self._quantize_stage(job.index, job.block, stages, stages_fp, job.ctx)
            t0 = time.perf_counter()
            stages, outs = advance_stages(gens)
            if gens_fp:
                stages_fp, outs_fp = advance_stages(gens_fp)
            self.tick("forward", t0)
        return [o.cpu() for o in outs], (None if outs_fp is None else [o.cpu() for o in outs_fp])

    def _quantize_stage(self, b, block, stages: list[Stage], stages_fp: list[Stage] | None, ctx):
        t0 = time.perf_counter()
        kinds = stages[0].kinds
        todo = [k for k in kinds if self.quantizes(b, k)]
        if not todo:     # every layer of the stage stays in full precision: no statistics needed
            return
        act = self.quantize_activations(block, todo, stages)
        # the statistics of what the matmuls see: the stage's input rotated and quantized as the layers do it
        first = self.family.linear(block, todo[0])
        xs = [prepare(first, st.x) for st in stages]
        cov = InputCovariance(stages[0].x.shape[-1], self.device, with_cross=stages_fp is not None)
        for i, x in enumerate(xs):
            cov.add(x, None if stages_fp is None else online_only(first, stages_fp[i].x))
        cov.reduce(self.ranks)
        extra_stats = self.stage_statistics(block, kinds, stages, ctx, xs)
        self.tick("statistics", t0)
        attention = kinds == self.family.attention_kinds
        fp_weights = {k: self.family.linear(block, k).weight.data.clone() for k in kinds} if attention else None
        solved = self._solve_shared(b, block, todo, cov, extra_stats) if self.ranks.active else {}
        for kind in todo:
            self.check_cancel()
            record = self._quantize_layer(b, block, kind, cov, extra_stats.get(kind, {}), solved.get(kind))
            record.extra.update(act)
            if attention:
                t1 = time.perf_counter()
                record.extra["attn_rel_error"] = self.attention_error(block, kind, fp_weights, stages, ctx)
                self.tick("measure", t1)
            self.emit_finished(record)

    def quantize_activations(self, block, todo, stages) -> dict:
        """For a stage whose inputs are quantized: the clip searched on them (unless given), and the
        relative error of the quantized input, both for the report."""
        layers = [self.family.linear(block, k) for k in todo]
        first = layers[0]
        if not isinstance(first, TransformedLinear) or not first.act.active:
            return {}
        n = max(1, min(len(stages), self.options.get("measure_batches", 2)))
        raw = torch.cat([online_only(first, st.x) for st in stages[:n]])
        if self.options.get("act_clip_search"):
            clip = search_clip(raw, first.act.bits, first.act.symmetric)
            clip = self.ranks.broadcast(clip, 0)     # the ranks saw different windows: one clip for all
            for layer in layers:
                layer.act = dataclasses.replace(layer.act, clip=clip)
        return {"act_rel_error": activation_error(raw, first.act(raw)), "act_clip": first.act.clip}

    def stage_statistics(self, block, kinds, stages, ctx, xs) -> dict:
        """Attention-aware Kronecker factors for q/k/v (BoA family), beyond the shared ``H_in``; ``xs`` are the
        stage's inputs as the layers' matmuls see them."""
        if not self.method.attention_aware or kinds != self.family.attention_kinds:
            return {}
        attn = self.family.attention(block)
        acc = AttentionHessians(self.geometry, stages[0].x.shape[1], stages[0].x.shape[-1], self.device,
                                self.options.get("value_output", "identity"))
        for st, x in zip(stages, xs):
            q, k, _ = self.family.qkv(attn, st.x, ctx)
            acc.add(x.float(), q.float(), k.float(), attn.scaling)
        acc.reduce(self.ranks)
        cos, sin = (None, None) if ctx is None else (ctx[0][0].float(), ctx[1][0].float())
        return acc.finish(cos, sin, self.family.linear(block, "o").weight.data)

    def attention_error(self, block, kind, fp_weights, stages, ctx) -> float:
        """Relative error of the attention output (before o_proj) with only ``kind`` quantized."""
        attn = self.family.attention(block)
        n = max(1, min(len(stages), self.options.get("measure_batches", 2)))
        layers = {k: self.family.linear(block, k) for k in fp_weights}
        now = {k: l.weight.data for k, l in layers.items()}
        num = den = 0.0
        try:
            for st in stages[:n]:
                for k, l in layers.items():
                    l.weight.data = fp_weights[k]
                ref = attend(*self.family.qkv(attn, st.x, ctx), attn.scaling)
                layers[kind].weight.data = now[kind]
                out = attend(*self.family.qkv(attn, st.x, ctx), attn.scaling)
                num += float((out - ref).pow(2).sum())
                den += float(ref.pow(2).sum())
        finally:
            for k, l in layers.items():
                l.weight.data = now[k]
        return num / den if den > 0 else 0.0

    def _solve(self, b, block, kind, cov: InputCovariance, stats: dict) -> tuple[SolveResult, float]:
        t0 = time.perf_counter()
        W = self.family.linear(block, kind).weight.data
        name = self.family.layer_name(b, kind)
        if not bool(torch.isfinite(W).all()):
            raise WorkbenchError(f"{name}: the weight has entries that are not finite (NaN or inf); the model "
                                 f"cannot be quantized as it is")
        if not bool(torch.isfinite(cov.H).all()):
            raise WorkbenchError(f"{name}: the calibration activations reaching this layer are not finite (NaN or "
                                 f"inf), so its Hessian is too; check the model in float32 on this text")
        try:
            res = self.method.layer(LayerProblem(W, cov.H, stats, cov.C, kind, self.grid_of(b, kind), self.solver,
                                                 self.options, self.check_cancel))
        except SolverError as exc:
            raise WorkbenchError(f"{name}: {exc}") from None
        return res, time.perf_counter() - t0

    def _solve_shared(self, b, block, todo, cov: InputCovariance, extra_stats: dict) -> dict:
        """Data-parallel: each layer of the stage solved on the rank assigned to it, then broadcast."""
        shapes = [self.family.linear(block, k).weight.shape for k in todo]
        owners = self.ranks.assign([float(o) * float(i) ** 2 for o, i in shapes])    # column-loop cost
        mine = {}
        for kind, owner in zip(todo, owners):
            if owner == self.ranks.rank:
                self.check_cancel()
                res, seconds = self._solve(b, block, kind, cov, extra_stats.get(kind, {}))
                res.quantized = res.quantized.cpu()
                mine[kind] = (res, seconds)
        return {kind: self.ranks.broadcast(mine.get(kind), owner) for kind, owner in zip(todo, owners)}

    def _quantize_layer(self, b, block, kind, cov: InputCovariance, stats: dict,
                        solved: tuple[SolveResult, float] | None = None) -> LayerRecord:
        layer = self.family.linear(block, kind)
        self.emit(kind="layer_started", block=b, layer=self.family.layer_name(b, kind), layer_kind=kind)
        W = layer.weight.data
        res, seconds = solved if solved is not None else self._solve(b, block, kind, cov, stats)
        res.quantized = _on_device(res.quantized, W.device)
        self.result.timings["solve"] += seconds
        if kind in self.family.attention_kinds:
            self.result.timings["solve_qkv"] += seconds
        return self.record(block, b, kind, res.quantized, W, cov.H, res.loss, seconds, res.extra)


def _on_device(q: QuantizedWeight, device) -> QuantizedWeight:
    return q if q.codes.device == device else QuantizedWeight(q.codes.to(device), q.scale.to(device),
                                                              q.zero.to(device), q.grid)


def advance_stages(gens):
    """Resume every batch's block generator to its next stage; returns (stages, None) or (None, outputs)."""
    stages, outs = [], []
    for g in gens:
        try:
            stages.append(next(g))
        except StopIteration as stop:
            outs.append(stop.value)
    if outs:
        return None, outs
    return stages, None
