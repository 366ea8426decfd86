"""Calibration and evaluation activations between blocks: in memory up to a bound, on disk beyond.

A run holds, at every block boundary, one hidden state per micro-batch (``n x L x d`` in all, twice
for the methods that run the full-precision stream beside the quantized one, once more for the
evaluation windows of a streamed perplexity). An ``ActivationPool`` keeps them in memory while
their total stays under its limit (``--activation-memory``) and writes the rest to raw files in
a scratch folder, read back whole when the next block needs them. The files are plain reads and
writes, not memory maps: a map's touched pages would stay in the resident set while it is open.

The pool also counts what it holds (``peak_memory``, ``peak_disk``): the report's per-phase
activation figures.
"""
from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .scratch import Scratch

GB = 10 ** 9


@dataclass
class _Spilled:
    path: str
    shape: tuple
    dtype: torch.dtype
    nbytes: int


def _write(t: torch.Tensor, path) -> _Spilled:
    t = t.detach().contiguous()
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    with open(path, "wb") as f:
        f.write(raw.numpy().data)
    return _Spilled(str(path), tuple(t.shape), t.dtype, raw.numel())


def _read(s: _Spilled) -> torch.Tensor:
    buf = torch.empty(s.nbytes, dtype=torch.uint8)
    with open(s.path, "rb") as f:
        got = f.readinto(buf.numpy())
    if got != s.nbytes:
        raise OSError(f"spilled activations {s.path} are truncated ({got} of {s.nbytes} bytes)")
    return buf.view(s.dtype).view(s.shape)


class _Ledger:
    """What one list holds, handed back to its pool when the list goes."""

    def __init__(self, pool: "ActivationPool"):
        self.pool = pool
        self.memory = 0
        self.files: list[_Spilled] = []

    def release(self):
        self.pool._change(-self.memory, -sum(s.nbytes for s in self.files))
        for s in self.files:
            try:
                os.unlink(s.path)
            except OSError:
                pass
        self.memory, self.files = 0, []


class ActivationList(Sequence):
    """Per-micro-batch tensors, some in memory, some on disk; reads like a list of tensors."""

    def __init__(self, pool: "ActivationPool"):
        self._pool = pool
        self._items: list = []
        self._ledger = _Ledger(pool)
        self._finalizer = weakref.finalize(self, self._ledger.release)

    def append(self, t: torch.Tensor):
        t = t.detach()
        size = t.numel() * t.element_size()
        if t.device.type == "cpu" and not self._pool.fits(size):
            spilled = _write(t, self._pool.scratch().file("act"))
            self._ledger.files.append(spilled)
            self._pool._change(0, size)
            self._items.append(spilled)
            return
        self._ledger.memory += size
        self._pool._change(size, 0)
        self._items.append(t)

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        item = self._items[i]
        return _read(item) if isinstance(item, _Spilled) else item

    def release(self):
        """Free the memory and files now (the list is empty afterwards)."""
        self._items = []
        self._finalizer()

    @property
    def spilled(self) -> int:
        """How many of the tensors are on disk."""
        return sum(isinstance(i, _Spilled) for i in self._items)


class ActivationPool:
    """The activations of one run; ``limit`` bytes in memory at most (None: no limit)."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.memory = self.disk = 0
        self.peak_memory = self.peak_disk = 0
        self._scratch: Scratch | None = None

    @classmethod
    def of_gigabytes(cls, gigabytes: float | None) -> "ActivationPool":
        return cls(None if gigabytes is None else int(gigabytes * GB))

    def fits(self, size: int) -> bool:
        return self.limit is None or self.memory + size <= self.limit

    def scratch(self) -> Scratch:
        if self._scratch is None:
            self._scratch = Scratch("activations")
        return self._scratch

    def _change(self, memory: int, disk: int):
        self.memory += memory
        self.disk += disk
        self.peak_memory = max(self.peak_memory, self.memory)
        self.peak_disk = max(self.peak_disk, self.disk)

    def new_list(self) -> ActivationList:
        return ActivationList(self)

    def hold(self, tensors) -> ActivationList | None:
        """``tensors`` (a list, or None for a stream the method does not run) held by the pool."""
        if tensors is None:
            return None
        held = ActivationList(self)
        for t in tensors:
            held.append(t)
        return held

    def reset_peaks(self):
        self.peak_memory, self.peak_disk = self.memory, self.disk

    def close(self):
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None
