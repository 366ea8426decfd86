"""Which devices a run may use: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` with N below the device count.

Anything else ``torch.device`` parses (``meta``, ``mps``, ``cuda:7`` on a one-GPU machine) is
refused before any work: a block moved to such a device cannot be brought back.
"""
from __future__ import annotations

import re

from .errors import WorkbenchError

FORMS = "auto, cpu, cuda or cuda:N"


def device_problem(value: str) -> str | None:
    """The complaint about ``value`` as a device name, or None (spelling only, no hardware asked)."""
    if value in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", value):
        return None
    return f"must be one of {FORMS}, got {value!r}"


def availability_problem(value: str) -> str | None:
    """The complaint about ``value`` on this machine (no CUDA, or an index beyond the devices), or None."""
    if not value.startswith("cuda"):
        return None
    import torch
    if not torch.cuda.is_available():
        return f"{value} was asked for but no CUDA device is available; use cpu or auto"
    count = torch.cuda.device_count()
    index = int(value.split(":")[1]) if ":" in value else 0
    if index >= count:
        names = ", ".join(f"cuda:{i}" for i in range(count))
        return (f"{value}: this machine has {count} CUDA device{'s' if count != 1 else ''} ({names}); "
                f"use one of them, cpu or auto")
    return None


def check_device(value: str, who: str = "--device") -> str:
    """``value`` if it names a device this machine has; otherwise ``WorkbenchError`` naming ``who``."""
    problem = device_problem(value)
    if problem:
        raise WorkbenchError(f"{who} {problem}")
    problem = availability_problem(value)
    if problem:
        raise WorkbenchError(f"{who} {problem}")
    return value


def resolve_device(value: str):
    """The ``torch.device`` of a checked device name (``auto``: the first GPU if there is one)."""
    import torch
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(check_device(value))
