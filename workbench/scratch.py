"""Scratch folders on disk for what a run spills out of memory (activations, quantized codes).

They live under the workbench's cache (``$WORKBENCH_SCRATCH`` overrides it), not in ``/tmp``, which
is often a RAM disk: a spill there would take the very memory it is meant to free. Each folder's
name carries its process id; a folder whose process is gone (killed mid-run) is removed by the next
run that makes one. A folder is removed when its owner closes it, is garbage collected, or the
process exits.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import weakref
from pathlib import Path

from .atomic import _alive

_NAME = re.compile(r"^run-(\d+)-[0-9a-f]+$")


def scratch_root() -> Path:
    if os.environ.get("WORKBENCH_SCRATCH"):
        return Path(os.environ["WORKBENCH_SCRATCH"])
    from .models.loading import cache_root
    return cache_root() / "scratch"


def remove_stale(root: Path):
    """Folders left by processes that are gone."""
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    for p in entries:
        m = _NAME.match(p.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


class Scratch:
    """One private folder; ``close()`` removes it (also at garbage collection and at exit)."""

    def __init__(self, kind: str):
        root = scratch_root()
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        self.path = root / f"run-{os.getpid()}-{secrets.token_hex(6)}"
        self.path.mkdir(mode=0o700)
        (self.path / "kind").write_text(kind)
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)
        self._count = 0

    def file(self, stem: str) -> Path:
        """A fresh file name inside the folder."""
        self._count += 1
        return self.path / f"{self._count:06d}-{stem}"

    def close(self):
        self._finalizer()

