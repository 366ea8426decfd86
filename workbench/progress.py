"""Progress of the long phases besides the layer walk (perplexity windows, held-out blocks, export):
``engine.Event("progress")`` from a phase's ``progress(done, total)`` callback, and the command line's
tqdm bars from the events.

A ``"progress"`` event says ``index`` of ``total`` ``unit`` s of the phase ``message`` are done; the
first comes at 0 before any work, the last at ``total``. Layer events keep their own counts.
"""
from __future__ import annotations

import sys
from typing import Callable

from .engine import Event

PROGRESS = "progress"


def phase_progress(on_event, message: str, unit: str) -> Callable[[int, int], None] | None:
    """A ``progress(done, total)`` callback emitting progress events for the phase ``message``; None
    when nobody listens (the phase then skips even the call)."""
    if on_event is None:
        return None

    def progress(done: int, total: int):
        on_event(Event(PROGRESS, index=int(done), total=int(total), message=message, unit=unit))
    return progress


def progress_label(ev: Event) -> str:
    """``gptq: quantized perplexity, 12/40 windows``."""
    unit = ev.unit or "step"
    return f"{ev.message}, {ev.index}/{ev.total} {unit}{'' if ev.total == 1 else 's'}"


def tqdm_bar(**kw):
    from tqdm.auto import tqdm
    return tqdm(**kw)


class ProgressBars:
    """Events as tqdm bars on stderr: one for the layers of the quantization, one per measured phase.
    Phase messages are not printed: a bad input must stay one line on stderr."""

    def __init__(self, desc: str, enabled: bool = True, file=None):
        self.desc, self.enabled, self.file = desc, enabled, file or sys.stderr
        self.layers = None
        self.phase = None
        self.phase_name = None

    def __call__(self, ev: Event):
        if not self.enabled:
            return
        if ev.kind == "start":
            self._close_phase()
            self.layers = tqdm_bar(total=ev.total, desc=self.desc, unit="layer", file=self.file)
        elif ev.kind == "layer_finished" and self.layers is not None:
            self.layers.update(1)
            self.layers.set_postfix_str(f"{ev.layer_kind}@{ev.block} err={ev.rel_error:.2e}")
        elif ev.kind == "done" and self.layers is not None:
            self.layers.close()
            self.layers = None
        elif ev.kind == PROGRESS:
            self._advance(ev.message, ev.index, ev.total, ev.unit or "step")
        elif ev.kind == "block_finished" and self.layers is None:
            # outside a layer walk, blocks count a walk of the model (the Hessian spectra)
            self._advance("Hessian spectra", ev.index, ev.total, "block")

    def _advance(self, name: str, done: int, total: int, unit: str):
        if self.phase is None or self.phase_name != name:
            self._close_phase()
            self.phase = tqdm_bar(total=total, desc=name, unit=unit, file=self.file)
            self.phase_name = name
        self.phase.update(done - self.phase.n)
        if done >= total:
            self._close_phase()

    def _close_phase(self):
        if self.phase is not None:
            self.phase.close()
        self.phase = self.phase_name = None

    def close(self):
        self._close_phase()
        if self.layers is not None:
            self.layers.close()
            self.layers = None
