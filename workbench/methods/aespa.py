"""aespa: layer-wise learned rounding on the attention-aware losses, from precomputed moments.

Each layer is quantized alone, but its rounding is learned (the shared optimizer of
``quant.rounding``) on the loss that matters for attention:

- q, k: the first-order logit error, ``tr(H_out dW H_in dW^T)`` per head with the key/query
  moments of ``attention_hessians`` as ``H_out`` (as in BoA);
- v: the head output error ``E||dW_V X A^T||^2 = tr(dW_V E[X A^T A X^T] dW_V^T)`` per KV head;
- o_proj and the MLP: the layer-wise ``tr(dW H dW^T)``.

The moments are computed once over all calibration data, so a step costs a few matmuls of the
weight's size and never a forward pass through the model. The rounding starts from round to
nearest (AdaRound) or from the codes of a GPTQ or BoA solve on the same grid (the default: see
``LearnedOptions.init``); the starting rounding is kept when learning ends above it on the loss.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable

import torch

from ..engine import LayerProblem
from ..quant.compiled import kernel
from ..quant.grid import GridConfig
from ..quant.rounding import LearnedRounding, optimize_rounding
from ..quant.solver import SolveResult, SolverConfig, kronecker_loss, solve
from ..quant.weight import from_codes
from .layerwise import GPTQ_SOLVER
from .learned import LearnedOptions

def as_heads(W: torch.Tensor, H_in: torch.Tensor, H_out: torch.Tensor | None) -> torch.Tensor:
    """``W [d_out, d_in]`` as ``[B, d_out / B, d_in]`` for ``B`` heads (1 without head factors)."""
    heads = H_out.shape[0] if H_out is not None else (H_in.shape[0] if H_in.dim() == 3 else 1)
    return W.reshape(heads, W.shape[0] // heads, W.shape[1])


# Once the regularizer is on, most h sit at 0 or 1 and stop moving (SmolLM2-135M at W3 g64, block
# 0's down_proj: 20% of its weights still move 10 steps after warmup, 4% after 50), so the product
# is updated by the sparse change instead of recomputed. Below this fraction of changed weights
# the update is the cheaper one (2 cores: 576 x 1536 weight at 5% changed, 6 against 15 ms).
SPARSE_UPDATE_DENSITY = 0.08
SPARSE_UPDATES_BEFORE_REFRESH = 64     # then one full product, so float error cannot build up


class MomentLoss:
    """``W_hat -> tr(H_out dW H_in dW^T) / tr(H_out W H_in W^T)`` summed over heads, ``dW = W_hat - W``.

    Relative, so that it is of order one like the rounding regularizer's weight expects. Its
    gradient is the product ``H_out dW H_in`` (scaled), since both factors are symmetric:
    ``value_and_grad`` gives both from one matmul and one dot, without autograd (a
    ``quant.rounding.ClosedFormLoss`` with ``W`` as the reference). For a plain ``dW H_in``
    it remembers the last product and, when few weights changed since, updates it by the change.
    """

    def __init__(self, W: torch.Tensor, H_in: torch.Tensor, H_out: torch.Tensor | None = None):
        self.reference = W.float()
        self.W3 = as_heads(self.reference, H_in, H_out)
        norm = float(kronecker_loss(self.W3, H_in, H_out))
        norm = norm if norm > 0 else 1.0
        self.H_in = H_in * (2.0 / norm)     # then the product is the gradient: d/dW tr(.) / norm
        self.H_out = H_out
        # sparse updates: one plain factor, on a device with sparse matmuls
        self.incremental = H_out is None and H_in.dim() == 2 and H_in.device.type in ("cpu", "cuda")
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None    # (dW, its product)
        self._sparse_updates = 0

    def _product(self, dW: torch.Tensor) -> torch.Tensor:
        return dW @ self.H_in if self.H_out is None else self.H_out @ dW @ self.H_in

    def __call__(self, W_hat: torch.Tensor) -> torch.Tensor:
        dW = W_hat.reshape(self.W3.shape) - self.W3
        return (self._product(dW) * dW).sum() / 2

    def value_and_grad(self, difference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dW = difference.reshape(self.W3.shape)
        P = self._next_product(dW) if self.incremental else self._product(dW)
        return torch.dot(P.reshape(-1), dW.reshape(-1)) / 2, P.reshape(difference.shape)

    def _next_product(self, dW: torch.Tensor) -> torch.Tensor:
        P = None
        if self._last is not None and self._sparse_updates < SPARSE_UPDATES_BEFORE_REFRESH:
            last_dW, last_P = self._last
            change, changed = kernel(_change)(dW, last_dW)
            if int(changed) <= SPARSE_UPDATE_DENSITY * dW.numel():
                P = torch.addmm(last_P[0], _as_csr(change[0]), self.H_in).unsqueeze(0)
                self._sparse_updates += 1
        if P is None:
            P = self._product(dW)
            self._sparse_updates = 0
        self._last = (dW, P)     # new tensors every step (the optimizer does not write into them)
        return P


def _change(new: torch.Tensor, old: torch.Tensor):
    """``new - old`` and how many of its entries are not zero, in one pass."""
    change = new - old
    return change, (change != 0).sum()


def _as_csr(m: torch.Tensor) -> torch.Tensor:
    """A mostly-zero matrix in compressed-row form (``to_sparse_csr`` is several times slower)."""
    flat = m.reshape(-1)
    index = flat.nonzero().squeeze(1)
    rows = torch.div(index, m.shape[1], rounding_mode="floor")
    crow = torch.zeros(m.shape[0] + 1, dtype=torch.int64, device=m.device)
    crow[1:] = torch.bincount(rows, minlength=m.shape[0]).cumsum(0)
    with warnings.catch_warnings():      # sparse CSR is marked beta
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, index - rows * m.shape[1], flat[index], m.shape)


def aespa_solve(W: torch.Tensor, H: torch.Tensor, stats: dict, grid: GridConfig, solver: SolverConfig,
                opts: LearnedOptions, check: Callable[[], None] | None = None) -> SolveResult:
    """Learned rounding of one layer on its (attention-aware) Kronecker loss.

    ``H``: the layer's input covariance; ``stats``: ``H_in``/``H_out`` overrides for q/k/v (from
    ``AttentionHessians``). ``solver`` is used for the BoA start (``init="boa"``).
    """
    t0 = time.perf_counter()
    W32 = W.detach().float()
    H_in = stats.get("H_in", H).float()
    H_out = stats.get("H_out")
    H_out = None if H_out is None else H_out.float()
    loss_fn = MomentLoss(W32, H_in, H_out)
    start = None
    if opts.init == "gptq":   # the gptq method's own solver settings (act-order...)
        gptq = dataclasses.replace(GPTQ_SOLVER, damp=solver.damp, block_size=solver.block_size)
        start = solve(W32, H, grid, gptq)
    elif opts.init == "boa":
        start = solve(W32, H_in, grid, solver, H_out=H_out, cross_H=None if H_in is H else H)
    r = LearnedRounding(W32, grid, scale=None if start is None else start.scale,
                        zero=None if start is None else start.zero,
                        codes=None if start is None else start.codes, init_margin=opts.init_margin,
                        column_weight=H.diagonal().float())
    with torch.no_grad():
        before = float(loss_fn(r(hard=True)))
    init_seconds = time.perf_counter() - t0
    callback = None if check is None else (lambda step, value: check())
    # the gradient in closed form: a step costs one matmul and no autograd graph
    hist = optimize_rounding([r], lambda: loss_fn(r()), opts.rounding(), callback=callback, closed_form=[loss_fn])
    res = r.result()
    after = hist.final_loss
    kept = "learned"
    if opts.keep_better and after > before:
        kept = "start"
        # round to nearest: the hard rounding of a fresh start
        res = LearnedRounding(W32, grid, column_weight=H.diagonal().float()).result() if start is None \
            else start.quantized
    norm_abs = float(kronecker_loss(as_heads(W32, H_in, H_out), H_in, H_out))
    q = from_codes(res.codes, res.scale, res.zero, grid)
    loss = float(kronecker_loss(as_heads(q.dequantize() - W32, H_in, H_out), H_in, H_out))
    extra = {"loss_before": before * norm_abs, "loss_after": after * norm_abs,
             "rel_loss_before": before, "rel_loss_after": after, "iters": opts.iters,
             "steps": len(hist.loss),     # fewer than iters where the rounding settled (``rounding.settled``)
             "init": opts.init, "kept": kept, "init_seconds": init_seconds, "opt_seconds": hist.seconds,
             **({} if start is None else start.extra)}    # the damping the start was solved with
    return SolveResult(q, loss, extra)


def aespa_layer(p: LayerProblem) -> SolveResult:
    """aespa's layer strategy: learned rounding on the layer's (attention-aware) moment loss."""
    return aespa_solve(p.W, p.H, p.stats, p.grid, p.solver, LearnedOptions(**p.options.get("learned", {})),
                       p.check_cancel)
