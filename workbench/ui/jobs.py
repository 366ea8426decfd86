"""Runs off the UI thread: a worker thread posts messages to a queue, a generator handler reads them.

The worker gets ``post(kind, payload)`` and a ``threading.Event`` it must pass on as the
engine's ``cancel``; its return value or exception ends the stream. The handler iterates
``Job.messages()``; if the page goes away mid-run, closing that iterator cancels the worker.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

log = logging.getLogger("workbench.ui")


@dataclass
class Message:
    kind: str          # worker-defined kinds, plus "result", "error", "cancelled" at the end
    payload: Any = None


class Job:
    def __init__(self, work: Callable[[Callable[[str, Any], None], threading.Event], Any], name: str = "run"):
        self.cancel = threading.Event()
        self._queue: queue.Queue[Message] = queue.Queue()
        self._thread = threading.Thread(target=self._main, args=(work,), name=f"workbench-{name}", daemon=True)
        self.started = time.perf_counter()

    def start(self) -> "Job":
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def post(self, kind: str, payload: Any = None):
        self._queue.put(Message(kind, payload))

    def _main(self, work):
        from ..errors import Cancelled
        try:
            self.post("result", work(self.post, self.cancel))
        except Cancelled:
            self.post("cancelled")
        except Exception as exc:   # shown in the page as one line; the trace goes to the server log
            log.exception("run failed")
            self.post("error", exc)

    def messages(self, idle: float = 0.5) -> Iterator[Message | None]:
        """Messages until the run ends; ``None`` every ``idle`` seconds without one (to refresh a clock)."""
        try:
            while True:
                try:
                    msg = self._queue.get(timeout=idle)
                except queue.Empty:
                    yield None
                    continue
                yield msg
                if msg.kind in ("result", "error", "cancelled"):
                    return
        finally:
            if self.running:   # the consumer left early (page closed): stop the worker too
                self.cancel.set()

    def join(self, timeout: float | None = None):
        self._thread.join(timeout)
