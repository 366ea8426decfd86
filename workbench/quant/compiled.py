"""Elementwise chains compiled into fused loops, with the eager function as the fallback.

A chain of a dozen elementwise ops over a weight is a dozen passes over memory in eager mode;
``torch.compile`` turns it into one. Where compiling is switched off (``WORKBENCH_COMPILE=0``)
or fails (no C++ compiler, an unsupported backend), the eager function runs: the same numbers
up to float rounding, only slower.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from ..errors import WorkbenchError

_KERNELS: dict = {}


def kernel(fn: Callable, dynamic: bool | None = False) -> Callable:
    """``fn`` compiled on first use. ``dynamic=False`` specializes on shapes (fastest loops, one
    compile per weight shape); ``True`` compiles once for all shapes (for calls on many shapes)."""
    switch = os.environ.get("WORKBENCH_COMPILE", "1")
    if switch not in ("0", "1"):
        raise WorkbenchError(f"WORKBENCH_COMPILE must be 0 (eager) or 1 (compiled), got {switch!r}")
    if switch == "0":
        return fn
    compiled = _KERNELS.get(fn)
    if compiled is None:
        compiled = _KERNELS[fn] = _with_fallback(fn, torch.compile(fn, dynamic=dynamic))
    return compiled


def transient(exc: BaseException) -> bool:
    """A failure of this call, not of compiling: out of memory (another run holds it for now)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _with_fallback(fn: Callable, compiled: Callable) -> Callable:
    # the kernels are shared by every run of the process (the app's sessions): one run's out-of-memory
    # must not turn them eager for all, only a compiler that cannot work (missing, unsupported) does
    state = {"failed": False}

    def call(*args):
        if state["failed"]:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as exc:
            if transient(exc):
                return fn(*args)
            warnings.warn(f"torch.compile failed for {fn.__name__} ({type(exc).__name__}: {exc}); "
                          "running it eagerly", RuntimeWarning, stacklevel=2)
            state["failed"] = True
            return fn(*args)
    return call
