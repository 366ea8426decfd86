"""Block-by-block sequential quantization.

Block i+1 is calibrated on the outputs of the already-quantized block i. Inside a block the
stages run in order (q/k/v, o, gate/up, down): each stage's statistics are accumulated batch
by batch from inputs that already went through the quantized earlier layers, so one forward
pass per block serves every layer. Only the block being worked on sits on the device.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .attention_hessians import AttentionHessians
from .errors import Cancelled
from .hessians import InputCovariance, relative_error
from .methods import MethodSpec
from .models import Family, Stage
from .models.base import attend
from .quant.grid import GridConfig, expand_groups, group_params, quantize_codes, rtn
from .quant.solver import SolveResult, SolverConfig, kronecker_loss, solve
from .report import LayerRecord


@dataclass
class Event:
    kind: str                   # "start", "layer_started", "layer_finished", "block_finished", "done"
    index: int = 0              # layers finished so far
    total: int = 0              # layers in the run
    block: int | None = None
    layer: str | None = None
    layer_kind: str | None = None
    loss: float | None = None
    rel_error: float | None = None
    seconds: float | None = None


@dataclass
class PackedLayer:
    """Integer codes and grid of one quantized linear, for export."""
    codes: torch.Tensor     # [d_out, d_in] uint8
    scale: torch.Tensor     # [d_out, n_groups]
    zero: torch.Tensor      # [d_out, n_groups]


@dataclass
class EngineResult:
    layers: list[LayerRecord] = field(default_factory=list)
    packed: dict[str, PackedLayer] = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from .errors import WorkbenchError
        raise WorkbenchError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    return torch.device(device)


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


def _ctx_to(ctx, device):
    if ctx is None:
        return None
    if isinstance(ctx, torch.Tensor):
        return ctx.to(device)
    return type(ctx)(_ctx_to(c, device) for c in ctx)


class BlockQuantizer:
    """Runs a method over the blocks of a model; emits events; can be cancelled between layers."""

    def __init__(self, model: nn.Module, family: Family, method: MethodSpec, grid: GridConfig,
                 solver: SolverConfig, device: torch.device, batch_size: int = 4,
                 max_blocks: int | None = None, on_event: Callable[[Event], None] | None = None,
                 cancel=None, options: dict | None = None):
        self.model, self.family, self.method, self.grid, self.solver = model, family, method, grid, solver
        self.device, self.batch_size, self.max_blocks = device, batch_size, max_blocks
        self.on_event, self.cancel, self.options = on_event, cancel, options or {}
        self.geometry = family.geometry(model.config)
        self.result = EngineResult(timings={"forward": 0.0, "statistics": 0.0, "solve": 0.0, "solve_qkv": 0.0,
                                            "measure": 0.0})
        self.done = 0

    # -- events ---------------------------------------------------------------------------
    def emit(self, **kw):
        if self.on_event is not None:
            self.on_event(Event(index=self.done, total=self.total, **kw))

    def check_cancel(self):
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("run cancelled")

    def _tick(self, key: str, t0: float) -> float:
        t = time.perf_counter()
        self.result.timings[key] += t - t0
        return t

    # -- the loop ---------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, ids: torch.Tensor) -> EngineResult:
        blocks = self.family.blocks(self.model)
        n_blocks = len(blocks) if self.max_blocks is None else min(self.max_blocks, len(blocks))
        self.total = n_blocks * len(self.family.linears)
        self.emit(kind="start")
        t0 = time.perf_counter()
        hidden = [h.cpu() for h in block_inputs(self.model, self.family, ids, self.batch_size)]
        ctx = _ctx_to(self.family.context(self.model, hidden[0]), self.device)
        hidden_fp = [h.clone() for h in hidden] if self.method.fp_stream else None
        t0 = self._tick("forward", t0)
        for b in range(n_blocks):
            block = blocks[b].to(self.device)
            fp_block = self._frozen_copy(block) if hidden_fp is not None else None
            hidden, hidden_fp = self._run_block(b, block, fp_block, hidden, hidden_fp, ctx)
            blocks[b] = block.cpu()
            self.emit(kind="block_finished", block=b)
        self.emit(kind="done")
        return self.result

    def _frozen_copy(self, block):
        return copy.deepcopy(block)

    def _run_block(self, b, block, fp_block, hidden, hidden_fp, ctx):
        dev = self.device
        gens = [self.family.block_forward(block, h.to(dev), ctx) for h in hidden]
        gens_fp = None if fp_block is None else [self.family.block_forward(fp_block, h.to(dev), ctx)
                                                 for h in hidden_fp]
        t0 = time.perf_counter()
        stages, outs = advance_stages(gens)
        stages_fp, outs_fp = advance_stages(gens_fp) if gens_fp else (None, None)
        self._tick("forward", t0)
        while stages is not None:
            self._quantize_stage(b, block, stages, stages_fp, ctx)
            t0 = time.perf_counter()
            stages, outs = advance_stages(gens)
            if gens_fp:
                stages_fp, outs_fp = advance_stages(gens_fp)
            self._tick("forward", t0)
        return [o.cpu() for o in outs], (None if outs_fp is None else [o.cpu() for o in outs_fp])

    def _quantize_stage(self, b, block, stages: list[Stage], stages_fp: list[Stage] | None, ctx):
        t0 = time.perf_counter()
        kinds = stages[0].kinds
        cov = InputCovariance(stages[0].x.shape[-1], self.device, with_cross=stages_fp is not None)
        for i, st in enumerate(stages):
            cov.add(st.x, None if stages_fp is None else stages_fp[i].x)
        extra_stats = self.stage_statistics(block, kinds, stages, ctx)
        self._tick("statistics", t0)
        attention = kinds == self.family.attention_kinds
        fp_weights = {k: self.family.linear(block, k).weight.data.clone() for k in kinds} if attention else None
        for kind in kinds:
            self.check_cancel()
            record = self._quantize_layer(b, block, kind, cov, extra_stats.get(kind, {}))
            if attention:
                t1 = time.perf_counter()
                record.extra["attn_rel_error"] = self.attention_error(block, kind, fp_weights, stages, ctx)
                self._tick("measure", t1)
            self.emit_finished(record)

    def stage_statistics(self, block, kinds, stages, ctx) -> dict:
        """Attention-aware Kronecker factors for q/k/v (BoA family), beyond the shared ``H_in``."""
        if not self.method.attention_aware or kinds != self.family.attention_kinds:
            return {}
        attn = self.family.attention(block)
        acc = AttentionHessians(self.geometry, stages[0].x.shape[1], stages[0].x.shape[-1], self.device,
                                self.options.get("value_output", "identity"))
        for st in stages:
            q, k, _ = self.family.qkv(attn, st.x, ctx)
            acc.add(st.x.float(), q.float(), k.float(), attn.scaling)
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

    def _quantize_layer(self, b, block, kind, cov: InputCovariance, stats: dict):
        layer = self.family.linear(block, kind)
        name = f"{self.family.blocks_path}.{b}.{self.family.linears[kind]}"
        self.emit(kind="layer_started", block=b, layer=name, layer_kind=kind)
        t0 = time.perf_counter()
        W = layer.weight.data
        H = cov.H
        res = self.solve_layer(W, H, kind, cov, stats)
        seconds = time.perf_counter() - t0
        self.result.timings["solve"] += seconds
        if kind in self.family.attention_kinds:
            self.result.timings["solve_qkv"] += seconds
        W32 = W.float()
        rel = relative_error(res.weight - W32, W32, H)
        layer.weight.data = res.weight.to(W.dtype)
        self.result.packed[name] = PackedLayer(res.codes.cpu(), res.scale.cpu(), res.zero.cpu())
        record = LayerRecord(name=name, block=b, kind=kind, loss=res.loss, rel_error=rel, seconds=seconds,
                             extra=dict(getattr(res, "extra", None) or {}))
        self.result.layers.append(record)
        self.done += 1
        return record

    def emit_finished(self, record: LayerRecord):
        self.emit(kind="layer_finished", block=record.block, layer=record.name, layer_kind=record.kind,
                  loss=record.loss, rel_error=record.rel_error, seconds=record.seconds)

    def solve_layer(self, W, H, kind, cov: InputCovariance, stats: dict) -> SolveResult:
        if self.method.learned == "layer":
            from .aespa import LearnedOptions, aespa_solve
            return aespa_solve(W, H, stats, self.grid, self.solver, LearnedOptions(**self.options.get("learned", {})),
                               self.check_cancel)
        if self.method.solver is None:
            return rtn_result(W, H, self.grid)
        H_in = stats.get("H_in", H)
        return solve(W, H_in, self.grid, self.solver, H_out=stats.get("H_out"), cross=cov.C,
                     cross_H=None if H_in is H else H)


def make_quantizer(model: nn.Module, family: Family, method: MethodSpec, *args, **kwargs) -> BlockQuantizer:
    """The engine for ``method``: block-wise learned rounding (BRECQ) has its own block loop."""
    if method.learned == "block":
        from .brecq import BlockReconstruction
        return BlockReconstruction(model, family, method, *args, **kwargs)
    return BlockQuantizer(model, family, method, *args, **kwargs)


def rtn_result(W: torch.Tensor, H: torch.Tensor, grid: GridConfig) -> SolveResult:
    W32 = W.float()
    scale, zero = group_params(W32, grid)
    C = W32.shape[-1]
    Q = rtn(W32, grid)
    codes = quantize_codes(W32, expand_groups(scale, C), expand_groups(zero, C), grid.maxq)
    loss = kronecker_loss((Q - W32).unsqueeze(0), H, None)
    return SolveResult(weight=Q, codes=codes.to(torch.uint8), scale=scale, zero=zero, loss=float(loss))


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
