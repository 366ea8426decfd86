"""Pieces every widget shares: notebook defaults, a model cache, live figures, the settings form,
and a background runner with progress, status and cancel."""
from __future__ import annotations

import dataclasses
import html
import os
import threading
import time
from typing import Callable

import ipywidgets as W
import plotly.graph_objects as go

from ..api import QuantizeConfig
from ..data import CachingTokenizer
from ..diagnostics import frozen_copy
from ..errors import Cancelled, WorkbenchError
from ..methods import METHODS
from ..models.loading import DEFAULT_MODEL, LoadedModel, load_model

FAST_ENV = "WORKBENCH_FAST"
MODEL_ENV = "WORKBENCH_NOTEBOOK_MODEL"
FIGURE_WIDGETS_ENV = "WORKBENCH_FIGURE_WIDGETS"
GROUP_SIZES = [32, 64, 192, -1]
CALIB_SOURCES = ["wikitext2"]


def fast_mode() -> bool:
    """``WORKBENCH_FAST=1`` (or true/yes): small runs for tests and quick looks."""
    return os.environ.get(FAST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def notebook_settings(**overrides) -> dict:
    """QuantizeConfig fields the notebooks start from.

    Normal: the embedded model, 16 calibration windows of 256 tokens, the first 6 blocks,
    8 evaluation windows. With ``WORKBENCH_FAST=1``: 4 windows of 64 tokens, 2 blocks,
    2 evaluation windows. ``WORKBENCH_NOTEBOOK_MODEL`` replaces the model in both cases.
    """
    if fast_mode():
        s = dict(calib_samples=4, seqlen=64, max_blocks=2, eval_windows=2)
    else:
        s = dict(calib_samples=16, seqlen=256, max_blocks=6, eval_windows=8)
    s["model"] = os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    s.update(overrides)
    return s


def genie_settings(**overrides) -> dict:
    """GenieRunConfig fields for the Genie notebook and gallery (small with ``WORKBENCH_FAST=1``)."""
    if fast_mode():
        s = dict(samples=32, distill_steps=10, distill_batch=32, iters=20)
    else:
        s = dict(samples=128, distill_steps=200, distill_batch=64, iters=300)
    s.update(overrides)
    return s


# -- models -----------------------------------------------------------------------------------
_MODELS: dict[str, LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


def full_precision(model: str) -> LoadedModel:
    """The full-precision model, loaded once per process and never modified (runs take copies).

    Walking it (spectra, reconstruction) briefly swaps its first block, so callers hold
    ``model_lock(model)`` while they do.
    """
    with _MODELS_LOCK:
        if model not in _MODELS:
            loaded = load_model(model)
            _MODELS[model] = dataclasses.replace(loaded, tokenizer=CachingTokenizer(loaded.tokenizer))
        return _MODELS[model]


_WALK_LOCKS: dict[str, threading.Lock] = {}


def model_lock(model: str) -> threading.Lock:
    with _MODELS_LOCK:
        return _WALK_LOCKS.setdefault(model, threading.Lock())


def working_copy(model: str) -> LoadedModel:
    """A private copy of the full-precision model for a run to quantize in place."""
    fp = full_precision(model)
    with model_lock(model):
        return dataclasses.replace(fp, model=frozen_copy(fp.model))


def forget_models():
    """Drop the cached models (frees memory)."""
    with _MODELS_LOCK:
        _MODELS.clear()


# -- live figures ----------------------------------------------------------------------------
def figure_widgets_available() -> bool:
    """plotly's FigureWidget needs ``anywidget``; without it figures are redrawn in an Output.

    ``WORKBENCH_FIGURE_WIDGETS=0`` asks for the Output version anyway: every FigureWidget
    carries plotly.js (about 5 MB) in its widget state, which a saved notebook keeps.
    """
    if os.environ.get(FIGURE_WIDGETS_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        import anywidget  # noqa: F401
        return True
    except ImportError:
        return False


class LiveFigure:
    """A plotly figure that is replaced in place as a run progresses.

    ``figure`` is the figure shown now: a ``go.FigureWidget`` (updated in place, clicks work)
    when ``anywidget`` is installed, otherwise a ``go.Figure`` redrawn in an ``Output``.
    ``widget`` is what to put in a layout.
    """

    def __init__(self, fig: go.Figure, use_widget: bool | None = None):
        self.use_widget = figure_widgets_available() if use_widget is None else use_widget
        self._lock = threading.Lock()
        if self.use_widget:
            self.figure = go.FigureWidget(fig)
            self.widget = self.figure
        else:
            self.figure = go.Figure(fig)
            self.widget = W.Output()
            self._draw()
        self.updates = 0

    def _draw(self):
        from IPython import get_ipython
        if get_ipython() is None:   # no kernel to show it in (plain Python, tests)
            return
        # one assignment, not ``with output: display(...)``: runs draw from worker threads
        bundle = self.figure._repr_mimebundle_()
        self.widget.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)

    def show(self, fig: go.Figure):
        """Replace traces and layout with those of ``fig`` (a figure from ``workbench.figures``)."""
        with self._lock:
            if self.use_widget:
                with self.figure.batch_update():
                    self.figure.data = []
                    self.figure.add_traces(list(fig.data))
                    self.figure.layout = fig.layout
            else:
                self.figure = go.Figure(fig)
                self._draw()
            self.updates += 1

    def on_click(self, callback: Callable, trace: int = 0):
        """``callback(x, y)`` when a point of ``trace`` is clicked (FigureWidget only)."""
        if not self.use_widget or len(self.figure.data) <= trace:
            return False

        def handler(tr, points, state):
            if points.xs:
                callback(points.xs[0], points.ys[0])
        self.figure.data[trace].on_click(handler)
        return True


def table_html(frame, digits: int = 4, max_rows: int = 60) -> str:
    """A pandas frame as compact HTML (floats to ``digits`` significant digits)."""
    fmt = {c: (lambda v: "" if v != v else f"{v:.{digits}g}") for c in frame.columns
           if str(frame[c].dtype).startswith("float")}
    return frame.head(max_rows).to_html(index=False, formatters=fmt, border=0, classes="wb-table")


# -- the settings form ---------------------------------------------------------------------
class SettingsForm(W.VBox):
    """Model, method, bits, group size and calibration, as widgets; ``config()`` makes the
    ``QuantizeConfig`` (other fields come from ``base``)."""

    def __init__(self, base: dict | None = None, methods: bool = True, **values):
        base = {**notebook_settings(), **(base or {}), **values}
        known = {f.name for f in dataclasses.fields(QuantizeConfig)}
        unknown = set(base) - known
        if unknown:
            raise WorkbenchError(f"unknown settings: {', '.join(sorted(unknown))}")
        self.base = base
        style = {"description_width": "110px"}
        self.model = W.Text(value=str(base.get("model", DEFAULT_MODEL)), description="model", style=style,
                            layout=W.Layout(width="420px"))
        self.method = W.Dropdown(options=list(METHODS), value=base.get("method", "gptq"), description="method",
                                 style=style)
        self.bits = W.IntSlider(value=base.get("bits", 4), min=2, max=8, description="bits", style=style)
        sizes = list(GROUP_SIZES)
        gs = base.get("group_size", 64)
        if gs not in sizes:
            sizes.append(gs)
        self.group_size = W.Dropdown(options=sizes, value=gs, description="group size", style=style)
        calib = base.get("calib", "wikitext2")
        self.calib = W.Combobox(value=calib, options=CALIB_SOURCES, description="calibration", style=style,
                                ensure_option=False)
        self.calib_samples = W.BoundedIntText(value=base.get("calib_samples", 32), min=1, max=4096,
                                              description="windows", style=style, layout=W.Layout(width="200px"))
        self.seqlen = W.BoundedIntText(value=base.get("seqlen", 512), min=2, max=8192, description="window length",
                                       style=style, layout=W.Layout(width="200px"))
        self.max_blocks = W.BoundedIntText(value=base.get("max_blocks") or 0, min=0, max=1000,
                                           description="blocks (0=all)", style=style, layout=W.Layout(width="200px"))
        self.eval_windows = W.BoundedIntText(value=base.get("eval_windows", 40), min=-1, max=100000,
                                             description="eval windows", style=style, layout=W.Layout(width="200px"))
        rows = [W.HBox([self.model, self.method] if methods else [self.model]),
                W.HBox([self.bits, self.group_size, self.calib]),
                W.HBox([self.calib_samples, self.seqlen, self.max_blocks, self.eval_windows])]
        super().__init__(rows)

    def set(self, **values):
        """Set form fields by name, e.g. ``form.set(bits=3, group_size=32)``."""
        for k, v in values.items():
            if k == "max_blocks":
                v = v or 0
            if not isinstance(getattr(self, k, None), W.ValueWidget):
                raise WorkbenchError(f"the form has no field {k!r}")
            w = getattr(self, k)
            low, high = getattr(w, "min", None), getattr(w, "max", None)
            if low is not None and not low <= v <= high:   # a slider would clamp silently
                raise WorkbenchError(f"{k} must be from {low} to {high}, got {v!r}")
            if isinstance(w, W.Dropdown) and v not in [o[1] if isinstance(o, tuple) else o for o in w.options]:
                w.options = list(w.options) + [v]          # e.g. a group size not in the list
            w.value = v

    def config(self, method: str | None = None) -> QuantizeConfig:
        values = dict(self.base)
        values.update(model=self.model.value.strip(), method=method or self.method.value, bits=self.bits.value,
                      group_size=self.group_size.value, calib=self.calib.value.strip(),
                      calib_samples=self.calib_samples.value, seqlen=self.seqlen.value,
                      max_blocks=self.max_blocks.value or None, eval_windows=self.eval_windows.value)
        cfg = QuantizeConfig(**values)
        cfg.validate()
        return cfg


# -- background runs -------------------------------------------------------------------------
def error_line(exc: BaseException) -> str:
    if isinstance(exc, WorkbenchError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Runner:
    """One background run at a time, with a progress bar, a status line and cancel.

    ``start(work)`` runs ``work(cancel)`` on a thread; ``wait()`` joins it. ``state`` is idle,
    running, done, cancelled or error; ``error`` holds the exception of a failed run.
    """

    def __init__(self):
        self.progress = W.IntProgress(value=0, min=0, max=1, description="", bar_style="info",
                                      layout=W.Layout(width="420px"))
        self.status = W.HTML(value="")
        self.state = "idle"
        self.error: BaseException | None = None
        self.cancel_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.started = 0.0
        self.seconds = 0.0

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def say(self, text: str, kind: str = "info"):
        color = {"info": "#1e40af", "ok": "#166534", "warn": "#92400e", "error": "#b91c1c"}[kind]
        self.status.value = f'<span style="color:{color}">{html.escape(text)}</span>'

    def set_progress(self, done: int, total: int):
        total = max(int(total), 1)
        self.progress.max = total
        self.progress.value = min(int(done), total)

    def check_idle(self):
        if self.running:
            raise WorkbenchError("a run is already in progress; wait for it or press Cancel")

    def start(self, work: Callable[[threading.Event], object], on_done: Callable[[object], None],
              label: str = "running") -> threading.Thread:
        self.check_idle()
        self.cancel_event = threading.Event()
        self.error, self.state, self.started = None, "running", time.perf_counter()
        self.progress.bar_style = "info"
        self.set_progress(0, 1)
        self.say(label)
        cancel = self.cancel_event

        def target():
            try:
                value = work(cancel)
                self.seconds = time.perf_counter() - self.started
                on_done(value)
                self.state = "done"
                self.progress.bar_style = "success"
                self.progress.value = self.progress.max
                self.say(f"done in {self.seconds:.1f} s", "ok")
            except Cancelled:
                self.state = "cancelled"
                self.progress.bar_style = "warning"
                self.say("cancelled", "warn")
            except BaseException as exc:   # shown in the status line, re-raised by run(wait=True)
                self.error, self.state = exc, "error"
                self.progress.bar_style = "danger"
                self.say(error_line(exc), "error")

        self.thread = threading.Thread(target=target, name="workbench-widget", daemon=True)
        self.thread.start()
        return self.thread

    def cancel(self) -> bool:
        """Ask the run to stop (between layers); False when nothing runs."""
        if not self.running:
            return False
        self.cancel_event.set()
        self.say("cancelling after the current layer...", "warn")
        return True

    def wait(self, timeout: float | None = None, raise_error: bool = True) -> str:
        if self.thread is not None:
            self.thread.join(timeout)
        if raise_error and self.error is not None:
            raise self.error
        return self.state


class Throttle:
    """True at most every ``seconds`` (live plots redraw at a readable pace)."""

    def __init__(self, seconds: float = 0.3):
        self.seconds, self.last = seconds, 0.0

    def __call__(self) -> bool:
        now = time.perf_counter()
        if now - self.last >= self.seconds:
            self.last = now
            return True
        return False
