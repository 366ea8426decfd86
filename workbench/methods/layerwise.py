"""Layer strategies of the column-loop solver: round to nearest, and GPTQ / BoA / TurboBoA."""
from __future__ import annotations

from ..engine import LayerProblem
from ..quant.grid import expand_groups, grid_functions, group_params
from ..quant.solver import SolveResult, SolverConfig, kronecker_loss, solve
from ..quant.weight import from_codes

# measured on smollm2-135m W4 g64 (fp 29.19): plain 36.42, MSE ranges 37.06, act-order 33.98,
# act-order with MSE ranges 33.48
GPTQ_SOLVER = SolverConfig(act_order=True)


def rtn_layer(p: LayerProblem) -> SolveResult:
    """Round to nearest on the grid; the loss is GPTQ's, for comparison."""
    W32 = p.W.float()
    scale, zero = group_params(W32, p.grid, p.H.diagonal().float())   # the weights of a hessian search
    C = W32.shape[-1]
    codes = grid_functions(p.grid)[1](W32, expand_groups(scale, C), expand_groups(zero, C), p.grid.maxq)
    q = from_codes(codes, scale, zero, p.grid)
    loss = kronecker_loss((q.dequantize() - W32).unsqueeze(0), p.H, None)
    return SolveResult(q, float(loss))


def solver_layer(p: LayerProblem) -> SolveResult:
    """The column-loop solver on the layer's loss: ``H_in`` (GPTQ), or the attention-aware factors
    the stage statistics hold for q/k/v (BoA, TurboBoA), with the inherited-error correction when
    the full-precision stream runs."""
    H_in = p.stats.get("H_in", p.H)
    return solve(p.W, H_in, p.grid, p.solver, H_out=p.stats.get("H_out"), cross=p.cross,
                 cross_H=None if H_in is p.H else p.H)
