"""Outputs that appear whole or not at all: written beside the target, then renamed."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from ..errors import WorkbenchError


def check_writable(path: str | Path, what: str) -> Path:
    """Fail before any long work if ``path`` cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise WorkbenchError(f"{what} path {p} is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise WorkbenchError(f"cannot write the {what} to {p}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise WorkbenchError(f"cannot write the {what} to {p}: folder {parent} is not writable; pick another path")
    return p


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temp path in the same folder; renamed onto ``path`` only if the block succeeds."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
