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
    # BoA and TurboBoA take the same act-order and MSE ranges. Measured on 4 blocks (16x256
    # calibration, W2 g64, fp 43.77): GPTQ 70.89; BoA with grids fixed at the start 73.61, with each
    # row's grids taken when the row is reached 68.37 (compensation through H_out moves rows off a
    # grid fixed beforehand: q's attention error was 4x GPTQ's with it); TurboBoA 65.18
    "boa": MethodSpec("boa", "attention-aware Hessians for q/k/v, rows of all heads one at a time",
                      SolverConfig(act_order=True, rows_per_step=1), attention_aware=True, grid_search="mse"),
    "turboboa": MethodSpec("turboboa", "BoA with joint rows, inherited-error correction, adaptive grid "
                           "and scale refinement",
                           SolverConfig(act_order=True, rows_per_step=8, refine_iters=2, dx_alpha=0.5),
                           attention_aware=True, fp_stream=True, grid_search="mse"),
    "aespa": MethodSpec("aespa", "learned rounding per layer on the attention-aware losses, from "
                        "precomputed moments (no forward pass while optimizing)",
                        # the BoA start solves 8 rows of every head at a time (TurboBoA's closed-form
                        # block step, same objective): 5x less solve time than row by row
                        SolverConfig(act_order=True, rows_per_step=8), attention_aware=True, grid_search="mse",
                        learned="layer"),
    "brecq": MethodSpec("brecq", "learned rounding of a whole block by backpropagation through it on the "
                        "calibration data (block-wise baseline)", None, learned="block",
                        grid_search="mse"),   # the same grids as aespa, so the two differ in the loss only
}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise WorkbenchError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
