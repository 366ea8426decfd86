"""Genie-M: block-wise reconstruction with learned rounding and learned step sizes.

The model's BN layers are folded into their convs; then, unit by unit (a residual block, a
stem, a lone layer), the quantized unit is fitted to the full-precision unit's output on the
calibration images. Its input comes from the already-quantized units before it, so errors are
corrected where they arise. The rounding optimizer is the shared one in quant/rounding.py.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import WorkbenchError
from ..quant.grid import GridConfig
from ..quant.rounding import RoundingConfig, optimize_rounding
from .bn_stats import frozen
from .distill import check_cancel
from .fold import fold_batchnorm, set_module
from .qlayers import LAYER_TYPES, QuantLayer, find_units

METHODS = ("genie", "rtn")


@dataclass(frozen=True)
class GenieMConfig:
    weight_bits: int = 4
    act_bits: int = 0              # 0: activations stay in float
    method: str = "genie"          # "rtn": round to nearest, activation steps from the data only
    iters: int = 1000              # optimization steps per unit
    batch_size: int = 32
    lr: float = 1e-2               # rounding variables V
    learn_scale: bool = True       # Genie-M learns the weight step jointly
    scale_lr: float = 1e-4
    act_lr: float = 4e-5
    reg_weight: float = 0.01
    warmup: float = 0.2
    ends_bits: int | None = 8      # first and last layer (weights and input); None: like the rest
    grid_search: str = "mse"
    seed: int = 0

    def __post_init__(self):
        for name, bits, allow_zero in (("weight", self.weight_bits, False), ("activation", self.act_bits, True)):
            if not isinstance(bits, int) or not (2 <= bits <= 8 or (allow_zero and bits == 0)):
                extra = " (or 0 for float activations)" if allow_zero else ""
                raise WorkbenchError(f"{name} bits must be an integer from 2 to 8{extra}, got {bits!r}")
        if self.ends_bits is not None and not (isinstance(self.ends_bits, int) and 2 <= self.ends_bits <= 8):
            raise WorkbenchError(f"first/last layer bits must be 2-8 or None, got {self.ends_bits!r}")
        if self.method not in METHODS:
            raise WorkbenchError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise WorkbenchError(f"batch size must be a positive integer, got {self.batch_size!r}")

    def rounding(self) -> RoundingConfig:
        return RoundingConfig(iters=self.iters, lr=self.lr, learn_scale=self.learn_scale,
                              scale_lr=self.scale_lr, reg_weight=self.reg_weight, warmup=self.warmup)


@dataclass
class UnitReport:
    name: str
    layers: list
    weight_bits: list
    rel_error: float               # ||f_q(x_q) - f(x)||^2 / ||f(x)||^2 on the calibration data
    start_rel_error: float         # the same with round-to-nearest weights, before optimizing
    loss: list = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class GenieMResult:
    model: nn.Module               # folded, quantized, eval mode
    units: list
    seconds: float


Callback = Callable[[str, int, float], None]


def recon_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over samples and positions."""
    return (out - target).pow(2).sum(1).mean()


class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, names: list[str], x: torch.Tensor, batch_size: int, what: str,
            stop_after: bool = False) -> dict[str, torch.Tensor]:
    """Inputs (``what='in'``) or outputs of the named modules on ``x``, batched."""
    store = {n: [] for n in names}
    hooks = []
    for n in names:
        m = model.get_submodule(n)
        if what == "in":
            def pre(mod, args, n=n):
                if len(args) != 1 or not torch.is_tensor(args[0]):
                    raise WorkbenchError(f"unit {n} takes {len(args)} inputs; block-wise reconstruction "
                                         "needs units with one tensor input")
                store[n].append(args[0].detach())
                if stop_after:
                    raise _Stop
            hooks.append(m.register_forward_pre_hook(pre))
        else:
            hooks.append(m.register_forward_hook(lambda mod, a, out, n=n: store[n].append(out.detach())))
    try:
        for i in range(0, len(x), batch_size):
            try:
                model(x[i:i + batch_size])
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


@torch.no_grad()
def execution_order(model: nn.Module, sample: torch.Tensor) -> list[str]:
    names = {m: n for n, m in model.named_modules()}
    order = []
    hooks = [m.register_forward_hook(lambda mod, a, o: order.append(names[mod]))
             for m in model.modules() if isinstance(m, LAYER_TYPES)]
    try:
        model(sample)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


@torch.no_grad()
def rel_error(unit: nn.Module, x: torch.Tensor, target: torch.Tensor, batch_size: int) -> float:
    err = sum(float((unit(x[i:i + batch_size]) - target[i:i + batch_size]).pow(2).sum())
              for i in range(0, len(x), batch_size))
    return err / max(float(target.pow(2).sum()), 1e-30)


def wrap_unit(qmodel: nn.Module, unit_name: str, cfg: GenieMConfig, ends: set[str]) -> list[QuantLayer]:
    """Replace the unit's Conv2d/Linear layers by QuantLayers (the first and last at ends_bits)."""
    unit = qmodel.get_submodule(unit_name)
    names = [unit_name] if isinstance(unit, LAYER_TYPES) else \
        [f"{unit_name}.{n}" for n, m in unit.named_modules() if isinstance(m, LAYER_TYPES)]
    wrapped = []
    for name in names:
        end = name in ends and cfg.ends_bits is not None
        w_bits = cfg.ends_bits if end else cfg.weight_bits
        a_bits = (cfg.ends_bits if end else cfg.act_bits) if cfg.act_bits else 0
        grid = GridConfig(bits=w_bits, group_size=-1, search=cfg.grid_search)
        q = QuantLayer(qmodel.get_submodule(name), grid, act_bits=a_bits,
                       learn_scale=cfg.learn_scale and cfg.method == "genie")
        set_module(qmodel, name, q)
        wrapped.append((name, q))
    return wrapped


def quantize_unit(qmodel: nn.Module, name: str, x_in: torch.Tensor, target: torch.Tensor,
                  cfg: GenieMConfig, ends: set[str], g: torch.Generator,
                  callback: Callback | None) -> UnitReport:
    t0 = time.perf_counter()
    wrapped = wrap_unit(qmodel, name, cfg, ends)
    unit = qmodel.get_submodule(name)
    layers = [q for _, q in wrapped]
    # activation steps start from the quantized inputs this unit really sees
    with torch.no_grad():
        unit(x_in[:256])
    start = rel_error(unit, x_in, target, 256)
    report = UnitReport(name=name, layers=[n for n, _ in wrapped], weight_bits=[q.weight_bits for q in layers],
                        rel_error=start, start_rel_error=start)
    if cfg.method == "genie" and cfg.iters > 0:
        acts = [q.act.step for q in layers if q.act is not None]

        def loss_fn():
            idx = torch.randint(0, len(x_in), (min(cfg.batch_size, len(x_in)),), generator=g).to(x_in.device)
            return recon_loss(unit(x_in[idx]), target[idx])

        hook = None if callback is None else (lambda s, l: callback(name, s, l))
        hist = optimize_rounding([q.rounder for q in layers], loss_fn, cfg.rounding(),
                                 extra_params=[{"params": acts, "lr": cfg.act_lr}], callback=hook)
        report.loss = hist.loss
        report.rel_error = rel_error(unit, x_in, target, 256)
    for q in layers:
        q.rounder.hard = True
        for p in q.parameters():
            p.requires_grad_(False)
    report.seconds = time.perf_counter() - t0
    return report


def _cancellable(callback: Callback | None, cancel) -> Callback:
    def hook(unit, step, loss):
        check_cancel(cancel)
        if callback is not None:
            callback(unit, step, loss)
    return hook


def quantize_model(model: nn.Module, calib: torch.Tensor, cfg: GenieMConfig = GenieMConfig(),
                   callback: Callback | None = None, device: str | torch.device = "cpu",
                   on_unit: Callable[[UnitReport], None] | None = None, cancel=None) -> GenieMResult:
    """Quantize a copy of ``model`` on ``calib`` images [N, C, H, W]; the original is untouched.

    ``callback(unit, step, loss)`` follows the optimization; ``on_unit(report)`` each finished unit.
    ``cancel`` (anything with ``is_set()``) stops the run with ``Cancelled`` between steps and units.
    """
    if len(calib) < 1:
        raise WorkbenchError("calibration set is empty; give at least one image")
    t0 = time.perf_counter()
    device = torch.device(device)
    g = torch.Generator().manual_seed(cfg.seed)
    calib = calib.to(device)
    with frozen(model):
        fp = fold_batchnorm(model, calib[:2]).to(device)
    fp.requires_grad_(False)
    qmodel = copy.deepcopy(fp)
    units = find_units(fp)
    if not units:
        raise WorkbenchError(f"{type(model).__name__} has no Conv2d or Linear layers to quantize")
    order = execution_order(fp, calib[:2])
    ends = {order[0], order[-1]}
    targets = capture(fp, units, calib, 256, "out")
    step_hook = callback if cancel is None else _cancellable(callback, cancel)
    reports = []
    for name in units:
        check_cancel(cancel)
        x_in = capture(qmodel, [name], calib, 256, "in", stop_after=True)[name]
        rep = quantize_unit(qmodel, name, x_in, targets.pop(name), cfg, ends, g, step_hook)
        reports.append(rep)
        if on_unit is not None:
            on_unit(rep)
    return GenieMResult(model=qmodel.eval(), units=reports, seconds=time.perf_counter() - t0)
