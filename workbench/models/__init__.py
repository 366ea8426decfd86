"""Model families the engine can walk, and how to load a model by name."""
from __future__ import annotations

from ..errors import WorkbenchError
from .base import AttentionGeometry, Family, Stage
from .llama import LLAMA
from .opt import OPT

FAMILIES = (LLAMA, OPT)


def family_for(config) -> Family:
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise WorkbenchError(f"unsupported architecture {model_type!r}; supported model types: {supported}")


__all__ = ["AttentionGeometry", "Family", "Stage", "FAMILIES", "family_for"]
