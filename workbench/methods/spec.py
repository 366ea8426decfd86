"""A method as data: the statistics it needs, its solver options, and its layer or block strategy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..quant.solver import SolverConfig


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    solver: SolverConfig | None      # the solver's options (None: no solver, e.g. round to nearest)
    layer: Callable | None = None    # LayerProblem -> SolveResult: how one linear of a stage is quantized
    block: Callable | None = None    # (BlockQuantizer, BlockJob) -> outputs: a block quantized as a whole
    attention_aware: bool = False    # statistics: q/k/v get attention-aware Kronecker factors (BoA family)
    fp_stream: bool = False          # statistics: the full-precision model runs beside (inherited-error correction)
    grid_search: str = "minmax"      # default range search of the grids
    tunes_scales: bool = False       # after a block is solved, its group scales are tuned on its output
