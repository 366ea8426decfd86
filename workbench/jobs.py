"""Work off the caller's thread: a worker posts messages, a consumer reads them or is called with them.

``Job(work)`` runs ``work(post, cancel)`` on a thread. ``post(kind, payload)`` sends a message;
``cancel`` is a ``threading.Event`` the work passes on to the engine. The work's return value,
``Cancelled`` or exception end the stream with a "result", "cancelled" or "error" message. A
consumer either iterates ``messages()`` (the app's generator handlers: closing the iterator early,
when a page goes away, cancels the work), or gives ``on_message`` to be called on the worker
thread (the widgets, which update themselves from there).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .errors import Cancelled

log = logging.getLogger("workbench.jobs")
ENDS = ("result", "error", "cancelled")


@dataclass
class Message:
    kind: str          # the work's own kinds, plus "result", "error", "cancelled" at the end
    payload: Any = None


class Job:
    def __init__(self, work: Callable[[Callable[[str, Any], None], threading.Event], Any], name: str = "run",
                 on_message: Callable[[Message], None] | None = None):
        self.cancel = threading.Event()
        self.state = "idle"            # idle, running, done, cancelled, error
        self.result: Any = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._on_message = on_message
        self._queue: queue.Queue[Message] = queue.Queue()
        self._thread = threading.Thread(target=self._main, args=(work,), name=f"workbench-{name}", daemon=True)
        self.started = time.perf_counter()

    def start(self) -> "Job":
        self.state, self.started = "running", time.perf_counter()
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def post(self, kind: str, payload: Any = None):
        msg = Message(kind, payload)
        if self._on_message is not None:
            self._on_message(msg)
        else:
            self._queue.put(msg)

    def _main(self, work):
        try:
            value = work(self.post, self.cancel)
            self.result, self.state = value, "done"
            end = Message("result", value)
        except Cancelled:
            self.state = "cancelled"
            end = Message("cancelled")
        except Exception as exc:   # shown to the user as one line; the trace goes to the log
            log.exception("run failed")
            self.error, self.state = exc, "error"
            end = Message("error", exc)
        self.seconds = time.perf_counter() - self.started
        try:
            self.post(end.kind, end.payload)
        except Exception:          # a consumer's failure must not leave the job looking alive
            log.exception("the consumer of a finished run failed")

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
                if msg.kind in ENDS:
                    return
        finally:
            if self.running:   # the consumer left early (page closed): stop the worker too
                self.cancel.set()

    def join(self, timeout: float | None = None):
        self._thread.join(timeout)
