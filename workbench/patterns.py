"""Layer-name patterns, read as llm-compressor reads its ``ignore`` list, plus globs.

A pattern is a module name (``lm_head``, ``model.layers.0.mlp.down_proj``), ``re:REGEX``
(matched from the start of the name, as ``re.match`` does) or a glob (``*.down_proj``,
``model.layers.1?.*``).
"""
from __future__ import annotations

import fnmatch
import re

GLOB = set("*?[")


def pattern_problem(patterns: tuple[str, ...]) -> str | None:
    """What is wrong with a list of patterns, or None."""
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                return f"has a bad regular expression {p!r}: {exc}"
    return None


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether module ``name`` is matched by any of ``patterns``."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif GLOB & set(p):
            if fnmatch.fnmatchcase(name, p):
                return True
        elif name == p:
            return True
    return False
