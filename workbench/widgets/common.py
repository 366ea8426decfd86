"""Pieces every widget shares: notebook defaults, a model cache, live figures, the settings form,
and a background runner with progress, status and cancel."""
from __future__ import annotations

import html
import os
import threading
import time
from typing import Callable

import ipywidgets as W
import plotly.graph_objects as go

from .. import workspace
from ..config import DEFAULTS, QUICK_LOOK, SETTINGS, QuantizeConfig, for_method
from ..errors import WorkbenchError
from ..jobs import Job, Message
from ..models.loading import DEFAULT_MODEL, LoadedModel
from ..progress import progress_label
from ..settings import METHOD_DEFAULT, Setting

FAST_ENV = "WORKBENCH_FAST"
MODEL_ENV = "WORKBENCH_NOTEBOOK_MODEL"
FIGURE_WIDGETS_ENV = "WORKBENCH_FIGURE_WIDGETS"
FACE = "widgets"


def fast_mode() -> bool:
    """``WORKBENCH_FAST=1`` (or true/yes): small runs for tests and quick looks."""
    return os.environ.get(FAST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def notebook_settings(**overrides) -> dict:
    """QuantizeConfig fields the notebooks start from.

    Normal: the embedded model with the app's quick look (``config.QUICK_LOOK``) but its bits, which
    each notebook sets. With ``WORKBENCH_FAST=1``: 4 windows of 64 tokens, 2 blocks, 2 evaluation
    windows. ``WORKBENCH_NOTEBOOK_MODEL`` replaces the model in both cases.
    """
    if fast_mode():
        s = dict(calib_samples=4, seqlen=64, max_blocks=2, eval_windows=2)
    else:
        s = {k: v for k, v in QUICK_LOOK.items() if k != "bits"}
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


# -- models (the workspace's cache, shared with everything else in the process) ---------------
def full_precision(model: str) -> LoadedModel:
    """The full-precision model, loaded once per process and never modified (runs take copies)."""
    return workspace.MODELS.get(model).private()


def forget_models():
    """Drop the cached models (frees memory)."""
    workspace.MODELS.clear()


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


def shown_figure(attribute: str, doc: str = "") -> property:
    """A property for the figure that the ``LiveFigure`` in ``attribute`` shows now."""
    return property(lambda self: getattr(self, attribute).figure, doc=doc or f"the figure of ``{attribute}``")


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
MAIN_ROWS = (("model", "method"), ("bits", "group_size", "calib"),
             ("calib_samples", "seqlen", "max_blocks", "eval_windows"))
STYLE = {"description_width": "130px"}


def setting_widget(s: Setting, value) -> W.ValueWidget:
    """The ipywidget for one setting. Numbers are text boxes so that the one validation, not the
    widget, decides what a bad value gets (a bounded box would clamp it silently)."""
    shown = s.form_value(value)
    kw = dict(description=s.label, style=STYLE, description_allow_html=False)
    if s.kind is bool and s.optional:
        return W.Dropdown(options=[METHOD_DEFAULT, "on", "off"], value=shown, **kw)
    if s.kind is bool:
        return W.Checkbox(value=bool(value), **kw)
    if s.choices:
        return W.Dropdown(options=([METHOD_DEFAULT] if s.optional else []) + list(s.choices), value=shown, **kw)
    if s.slider and s.kind is int:
        return W.IntSlider(value=shown, min=int(s.low), max=int(s.high), step=int(s.step or 1), **kw)
    if s.slider:
        return W.FloatSlider(value=shown, min=s.low, max=s.high, step=s.step, **kw)
    text = "" if shown is None else str(shown)
    if s.suggestions:
        return W.Combobox(value=text, options=[str(o) for o in s.suggestions], ensure_option=False, **kw)
    return W.Text(value=text, placeholder=s.none_means if s.optional else "", **kw)


class SettingsForm(W.VBox):
    """Every setting as a widget, derived from the declarations; ``config()`` makes the
    ``QuantizeConfig`` through the one validation (messages name the field labels).

    The model, method, grid and data sit on top, the rest under "more settings".
    """

    def __init__(self, base: dict | None = None, methods: bool = True, **values):
        start = {**notebook_settings(), **(base or {}), **values}
        unknown = set(start) - set(SETTINGS)
        if unknown:
            raise WorkbenchError(f"unknown settings: {', '.join(sorted(unknown))}")
        values = {**DEFAULTS, **{k: SETTINGS[k].parse(v, FACE) for k, v in start.items()}}
        shown = {n: s for n, s in SETTINGS.items() if FACE in s.faces and (methods or n != "method")}
        self.fields = {n: setting_widget(s, values[n]) for n, s in shown.items()}
        self.method_name = values["method"]
        top = [W.HBox([self.fields[n] for n in row if n in self.fields]) for row in MAIN_ROWS]
        rest = [w for n, w in self.fields.items() if not any(n in row for row in MAIN_ROWS)]
        more = W.Accordion(children=[W.GridBox(rest, layout=W.Layout(grid_template_columns="repeat(2, 360px)"))])
        more.set_title(0, "more settings")
        super().__init__(top + [more])

    def __getattr__(self, name):
        fields = self.__dict__.get("fields", {})
        if name in fields:
            return fields[name]
        raise AttributeError(name)

    def values(self) -> dict:
        return {n: w.value for n, w in self.fields.items()}

    def set(self, **values):
        """Set fields by name, e.g. ``form.set(bits=3, group_size=32)``; each value is checked first."""
        for k, v in values.items():
            if k not in self.fields:
                raise WorkbenchError(f"the form has no field {k!r}; fields: {', '.join(self.fields)}")
            s = SETTINGS[k]
            shown = s.form_value(s.parse(v, FACE))
            w = self.fields[k]
            if isinstance(w, W.Dropdown) and shown not in w.options:
                w.options = list(w.options) + [shown]
            w.value = shown if isinstance(w, (W.Dropdown, W.Checkbox, W.IntSlider, W.FloatSlider)) else \
                ("" if shown is None else str(shown))

    def config(self, method: str | None = None) -> QuantizeConfig:
        """The config of ``method`` (default: the form's); fields that do not apply to it are left out."""
        values = self.values()
        chosen = method or values.get("method", self.method_name)
        return for_method(values, chosen, FACE)


# -- background runs -------------------------------------------------------------------------
def error_line(exc: BaseException) -> str:
    if isinstance(exc, WorkbenchError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Runner:
    """One background run at a time (a ``jobs.Job``), with a progress bar, a status line and cancel.

    ``start(work, on_done)`` runs ``work(cancel)`` and then ``on_done(value)`` on the worker
    thread; ``wait()`` joins it. ``state`` is idle, running, done, cancelled or error; ``error``
    holds the exception of a failed run.
    """

    def __init__(self):
        self.progress = W.IntProgress(value=0, min=0, max=1, description="", bar_style="info",
                                      layout=W.Layout(width="420px"))
        self.status = W.HTML(value="")
        self.job: Job | None = None
        self._state = "idle"
        self.error: BaseException | None = None

    @property
    def state(self) -> str:
        return self._state

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    @property
    def seconds(self) -> float:
        return 0.0 if self.job is None else self.job.seconds

    def say(self, text: str, kind: str = "info"):
        color = {"info": "#1e40af", "ok": "#166534", "warn": "#92400e", "error": "#b91c1c"}[kind]
        self.status.value = f'<span style="color:{color}">{html.escape(text)}</span>'

    def set_progress(self, done: int, total: int):
        total = max(int(total), 1)
        self.progress.max = total
        self.progress.value = min(int(done), total)

    def show_phase(self, ev, bar: bool = True):
        """A measured phase's ``"progress"`` event (perplexity windows, held-out blocks, a conversion):
        its counts in the status line and, with ``bar``, on the progress bar."""
        if bar:
            self.set_progress(ev.index, ev.total)
        self.say(progress_label(ev))

    def follow(self, ev, what: str):
        """A run's engine event on the status line and bar: phases, measured phases, ``what: i/n layers``."""
        if ev.kind == "phase":
            self.say(ev.message)
        elif ev.kind == "progress":
            self.show_phase(ev)
        elif ev.kind == "layer_finished":
            self.set_progress(ev.index, ev.total)
            self.say(f"{what}: {ev.index}/{ev.total} layers")

    def check_idle(self):
        if self.running:
            raise WorkbenchError("a run is already in progress; wait for it or press Cancel")

    def start(self, work: Callable[[threading.Event], object], on_done: Callable[[object], None],
              label: str = "running") -> Job:
        self.check_idle()
        self.error, self._state = None, "running"
        self.progress.bar_style = "info"
        self.set_progress(0, 1)
        self.say(label)

        def finished(msg: Message):
            if msg.kind == "result":
                try:
                    on_done(msg.payload)
                except Exception as exc:   # drawing the result failed: the run counts as failed
                    self._failed(exc)
                    return
                self._state = "done"
                self.progress.bar_style = "success"
                self.progress.value = self.progress.max
                self.say(f"done in {self.job.seconds:.1f} s", "ok")
            elif msg.kind == "cancelled":
                self._state = "cancelled"
                self.progress.bar_style = "warning"
                self.say("cancelled", "warn")
            elif msg.kind == "error":
                self._failed(msg.payload)

        self.job = Job(lambda post, cancel: work(cancel), "widget", on_message=finished).start()
        return self.job

    def _failed(self, exc: BaseException):
        self.error, self._state = exc, "error"
        self.progress.bar_style = "danger"
        self.say(error_line(exc), "error")

    def cancel(self) -> bool:
        """Ask the run to stop; False when nothing runs."""
        if not self.running:
            return False
        self.job.cancel.set()
        self.say("cancelling...", "warn")
        return True

    def wait(self, timeout: float | None = None, raise_error: bool = True) -> str:
        if self.job is not None:
            self.job.join(timeout)
        if raise_error and self.error is not None:
            raise self.error
        return self.state


class RunWidget(W.VBox):
    """A widget with a form-driven run: Run and Cancel buttons, a ``Runner``, ``state``, ``wait``.

    Subclasses define ``run(wait=True, **settings)`` and lay themselves out with ``buttons()``.
    """

    run_label = "Run"

    def _setup_runner(self):
        self.runner = Runner()
        self.run_button = W.Button(description=self.run_label, button_style="primary", icon="play")
        self.cancel_button = W.Button(description="Cancel", button_style="warning", icon="stop")
        self.run_button.on_click(lambda _: self._click_run())
        self.cancel_button.on_click(lambda _: self.cancel())

    def buttons(self, *extra) -> W.HBox:
        return W.HBox([self.run_button, self.cancel_button, *extra, self.runner.progress])

    @property
    def state(self) -> str:
        return self.runner.state

    def _click_run(self):
        try:
            self.run(wait=False)
        except Exception as exc:
            self.runner.say(error_line(exc), "error")

    def run(self, wait: bool = True, **settings):
        raise NotImplementedError

    def cancel(self) -> bool:
        return self.runner.cancel()

    def wait(self, timeout: float | None = None) -> str:
        return self.runner.wait(timeout)

    def _finish(self, wait: bool, value):
        """After ``runner.start``: wait for the run and return ``value()``, or return None at once."""
        if wait:
            self.runner.wait()
            return value()
        return None


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
