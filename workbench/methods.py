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


METHODS: dict[str, MethodSpec] = {
    "rtn": MethodSpec("rtn", "round to nearest: the floor every method must beat", None),
    "gptq": MethodSpec("gptq", "layer-wise, one column at a time with Hessian compensation", SolverConfig()),
}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise WorkbenchError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
