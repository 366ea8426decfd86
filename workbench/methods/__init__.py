"""The methods as data: each names its statistics, its solver options and its layer or block
strategy; the engine reads these and knows no method by name."""
from __future__ import annotations

from ..errors import WorkbenchError
from ..quant.solver import SolverConfig
from .aespa import aespa_layer
from .brecq import brecq_block
from .layerwise import GPTQ_SOLVER, rtn_layer, solver_layer
from .learned import INITS, LearnedOptions
from .scale_tuning import ScaleTuning, tuned_stages
from .spec import MethodSpec

METHODS: dict[str, MethodSpec] = {
    "rtn": MethodSpec("rtn", "round to nearest: the floor every method must beat", None, layer=rtn_layer),
    "gptq": MethodSpec("gptq", "layer-wise, one column at a time with Hessian compensation",
                       GPTQ_SOLVER, layer=solver_layer, grid_search="mse"),
    # BoA and TurboBoA take the same act-order and MSE ranges. Measured on 4 blocks (16x256
    # calibration, W2 g64, fp 43.77): GPTQ 70.89; BoA with grids fixed at the start 73.61, with each
    # row's grids taken when the row is reached 68.37 (compensation through H_out moves rows off a
    # grid fixed beforehand: q's attention error was 4x GPTQ's with it); TurboBoA 65.18
    "boa": MethodSpec("boa", "attention-aware Hessians for q/k/v, rows of all heads one at a time",
                      SolverConfig(act_order=True, rows_per_step=1), layer=solver_layer, attention_aware=True,
                      grid_search="mse"),
    "turboboa": MethodSpec("turboboa", "BoA with joint rows, inherited-error correction, adaptive grid "
                           "and scale refinement",
                           SolverConfig(act_order=True, rows_per_step=8, refine_iters=2, dx_alpha=0.5),
                           layer=solver_layer, attention_aware=True, fp_stream=True, grid_search="mse"),
    # The low-bit method. On the first 8 blocks at W2 g64 (32x512 calibration, 16 windows, fp 36.64): TurboBoA
    # 58.91; damp 0.1 54.62 (0.03: 55.89, 0.3: 54.55); its scales tuned block by block 51.18; then 32 end-to-end
    # steps 44.48. The whole model, W2 g64: 71.07 in 271 s (TurboBoA 101); W3 g64: 32.09 (TurboBoA 40.29)
    "turboboa-tuned": MethodSpec("turboboa-tuned", "TurboBoA, then the group scales tuned with the codes kept: each "
                                 "block's on its output against the full-precision block, then all at once on the "
                                 "model's next-token loss",
                                 SolverConfig(damp=0.1, act_order=True, rows_per_step=8, refine_iters=2, dx_alpha=0.5),
                                 layer=solver_layer, block=tuned_stages, attention_aware=True, fp_stream=True,
                                 grid_search="mse", tunes_scales=True),
    "aespa": MethodSpec("aespa", "learned rounding per layer on the attention-aware losses, from "
                        "precomputed moments (no forward pass while optimizing)",
                        # the BoA start solves 8 rows of every head at a time (TurboBoA's closed-form
                        # block step, same objective): 5x less solve time than row by row
                        SolverConfig(act_order=True, rows_per_step=8), layer=aespa_layer, attention_aware=True,
                        grid_search="mse"),
    "brecq": MethodSpec("brecq", "learned rounding of a whole block by backpropagation through it on the "
                        "calibration data (block-wise baseline)", None, block=brecq_block,
                        grid_search="mse"),   # the same grids as aespa, so the two differ in the loss only
}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise WorkbenchError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "MethodSpec", "method_spec", "LearnedOptions", "INITS", "ScaleTuning"]
