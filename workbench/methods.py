"""The methods as data: which solver options, which statistics. Dispatch is a table lookup."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import WorkbenchError
from .quant.solver import SolverConfig


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    solver: SolverConfig | None      # None: round to nearest, no solver
    attention_aware: bool = False    # q/k/v get attention-aware Hessians (BoA family)
    fp_stream: bool = False          # also run the full-precision model (inherited-error correction)
    grid_search: str = "minmax"      # default range search of the grids
    learned: str | None = None       # learned rounding: "layer" on moment losses (aespa), "block" (BRECQ)


METHODS: dict[str, MethodSpec] = {
    "rtn": MethodSpec("rtn", "round to nearest: the floor every method must beat", None),
    # measured on smollm2-135m W4 g64 (fp 29.19): plain 36.42, MSE ranges 37.06, act-order 33.98,
    # act-order with MSE ranges 33.48
    "gptq": MethodSpec("gptq", "layer-wise, one column at a time with Hessian compensation",
                       SolverConfig(act_order=True), grid_search="mse"),
    "boa": MethodSpec("boa", "attention-aware Hessians for q/k/v, rows of all heads one at a time",
                      SolverConfig(rows_per_step=1, grid_at_start=True), attention_aware=True),
    "turboboa": MethodSpec("turboboa", "BoA with joint rows, inherited-error correction, adaptive grid "
                           "and scale refinement",
                           SolverConfig(rows_per_step=8, grid_at_start=False, refine_iters=2, dx_alpha=0.5),
                           attention_aware=True, fp_stream=True),
    "aespa": MethodSpec("aespa", "learned rounding per layer on the attention-aware losses, from "
                        "precomputed moments (no forward pass while optimizing)",
                        SolverConfig(rows_per_step=1, grid_at_start=True), attention_aware=True, learned="layer"),
    "brecq": MethodSpec("brecq", "learned rounding of a whole block by backpropagation through it on the "
                        "calibration data (block-wise baseline)", None, learned="block"),
}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise WorkbenchError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
