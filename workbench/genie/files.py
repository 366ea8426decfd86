"""Outputs that appear whole or not at all: written beside the target, then renamed."""
from __future__ import annotations

import os
from pathlib import Path

from .. import atomic
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


def atomic_path(path: str | Path):
    """Yields an unguessable temp path in the same folder; renamed onto ``path`` (synced first) only if the
    block succeeds. See ``workbench.atomic``."""
    return atomic.atomic_path(path)
