"""Memory: what a run used at its peak, and what the machine has free.

``ru_maxrss`` and ``torch.cuda.max_memory_allocated`` are process-wide high-water marks: in the app,
where several sessions run in one process, they report the largest run since the server started,
and resetting the CUDA one would reset it under every other run. A ``PeakMeter`` instead samples
the current figure while its run goes on, so a run reports the peak of its own time span.
"""
from __future__ import annotations

import os
import threading
import weakref

import torch

INTERVAL = 0.02     # seconds between samples: short steps (a forward of a block) are caught too


def rss_bytes() -> int:
    """Resident memory of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):   # not Linux: the high-water mark is the best there is
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def used_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return rss_bytes()


def available_bytes(device: torch.device) -> int:
    """Memory a run could still take on ``device``: free GPU memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class PeakMeter:
    """The highest ``used_bytes(device)`` between ``start()`` and ``stop()`` (or now)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = self.peak = used_bytes(device)
        self._stop = threading.Event()

    def start(self) -> "PeakMeter":
        # the sampler holds the meter weakly: a run that fails before ``stop`` does not leave it running
        t = threading.Thread(target=_sample, args=(weakref.ref(self), self._stop), name="workbench-memory",
                             daemon=True)
        t.start()
        return self

    def sample(self):
        self.peak = max(self.peak, used_bytes(self.device))

    def stop(self) -> int:
        self._stop.set()
        self.sample()
        return self.peak

    def __del__(self):
        self._stop.set()


def _sample(ref, stop: threading.Event):
    while not stop.wait(INTERVAL):
        meter = ref()
        if meter is None:
            return
        meter.sample()
        del meter
