"""JSON that every reader accepts: numbers out of range become ``null`` and are listed, not written as NaN.

``json.dumps`` writes ``NaN`` and ``Infinity`` by default, which is not JSON (browsers, ``jq``
and most languages refuse the file). A report whose quantized perplexity overflowed is still
worth keeping, so such values are written as ``null`` and named in ``"non_finite"``: a map from
the value's JSON pointer (RFC 6901, ``/layers/3/loss``) to ``"nan"``, ``"inf"`` or ``"-inf"``.
``restore`` puts them back when the file is read.
"""
from __future__ import annotations

import json
import math

KEY = "non_finite"


def _escape(key) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _clean(obj, pointer: str, flags: dict):
    if isinstance(obj, float) and not math.isfinite(obj):
        flags[pointer] = "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
        return None
    if isinstance(obj, dict):
        return {k: _clean(v, f"{pointer}/{_escape(k)}", flags) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, f"{pointer}/{i}", flags) for i, v in enumerate(obj)]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:   # numpy / torch scalars
        return _clean(obj.item(), pointer, flags)
    return obj


def flagged(obj: dict) -> dict:
    """``obj`` with every non-finite float as None and, when there were any, ``"non_finite"`` naming them."""
    flags: dict = {}
    clean = _clean(obj, "", flags)
    if flags:
        clean[KEY] = flags
    return clean


def dumps(obj, **kw) -> str:
    """Strict JSON text of ``obj`` (a dict, or a list of dicts each flagged on its own)."""
    clean = [flagged(o) for o in obj] if isinstance(obj, list) else flagged(obj)
    return json.dumps(clean, allow_nan=False, **kw)


def restore(obj: dict) -> dict:
    """``obj`` read back with the values ``"non_finite"`` names put back as floats."""
    obj = dict(obj)
    for pointer, text in (obj.pop(KEY, None) or {}).items():
        *path, last = [_unescape(t) for t in pointer.split("/")[1:]]
        target = obj
        for token in path:
            target = target[int(token)] if isinstance(target, list) else target[token]
        target[int(last) if isinstance(target, list) else last] = float(text)
    return obj
