"""Quantize one model with one method; a progress bar and the per-layer error curve grow live."""
from __future__ import annotations

import ipywidgets as W
import pandas as pd

from .. import workspace
from ..api import QuantizeResult
from ..figures import empty_figure, kind_error_figure, progress_figure
from ..figures.layers import layer_error_figure
from .common import LiveFigure, RunWidget, SettingsForm, Throttle, table_html, shown_figure

CURVE_TITLE = "Relative output error per layer"


class QuantizeWidget(RunWidget):
    """Form, Run and Cancel, a progress bar, the live per-layer error curve and the report.

    Programmatic use::

        w = QuantizeWidget(model="smollm2-135m", method="gptq", bits=4)
        result = w.run()            # waits; w.run(wait=False) returns at once
        w.report.to_frame(); w.figure.data[0].y

    ``figure``: the live error curve (``LiveFigure.figure``); ``kinds_figure``: mean error
    by layer kind; ``result``: the ``QuantizeResult``; ``events``: every engine event.
    """

    def __init__(self, use_figure_widget: bool | None = None, plot_every: float = 0.3, **settings):
        self.form = SettingsForm(**settings)
        self.plot_every = plot_every
        self._setup_runner()
        self.curve = LiveFigure(empty_figure(CURVE_TITLE, "press Run"), use_figure_widget)
        self.kinds = LiveFigure(empty_figure("Mean error by layer kind", "after the run"), use_figure_widget)
        self.summary = W.HTML()
        self.table = W.HTML()
        self.result: QuantizeResult | None = None
        self.events: list = []
        self.live: list[dict] = []
        self.total = 0
        super().__init__([self.form, self.buttons(), self.runner.status, self.curve.widget, self.summary,
                          W.HBox([self.kinds.widget, self.table])])

    # -- what tests and notebooks read ----------------------------------------------------
    figure = shown_figure("curve")
    kinds_figure = shown_figure("kinds")

    @property
    def report(self):
        return None if self.result is None else self.result.report

    @property
    def frame(self) -> pd.DataFrame | None:
        return None if self.result is None else self.result.report.to_frame()

    # -- running -------------------------------------------------------------------------------
    def run(self, wait: bool = True, **settings) -> QuantizeResult | None:
        """Quantize with the form's settings (``settings`` set form fields first)."""
        self.runner.check_idle()
        if settings:
            self.form.set(**settings)
        cfg = self.form.config()
        self.events, self.live, self.total, self.result = [], [], 0, None
        throttle = Throttle(self.plot_every)
        self.curve.show(empty_figure(CURVE_TITLE, f"loading {cfg.model}"))

        def on_event(ev):
            if ev.kind == "phase":
                self.runner.say(ev.message)
                return
            if ev.kind == "progress":
                self.runner.show_phase(ev)
                return
            self.events.append(ev)
            self.total = ev.total or self.total
            if ev.kind == "layer_finished":
                self.live.append({"method": cfg.method, "name": ev.layer, "block": ev.block,
                                  "kind": ev.layer_kind, "rel_error": ev.rel_error})
                self.runner.set_progress(ev.index, ev.total)
                self.runner.say(f"{cfg.method}: {ev.index}/{ev.total} layers, last {ev.layer}")
                if throttle():
                    self._draw_live()
            elif ev.kind == "start":
                self.runner.set_progress(0, ev.total)
                self.runner.say(f"{cfg.method}: calibrating")

        self.runner.start(lambda cancel: workspace.quantize_copy(cfg, on_event=on_event, cancel=cancel),
                          self._finished, f"loading {cfg.model}")
        return self._finish(wait, lambda: self.result)

    def _draw_live(self):
        self.curve.show(progress_figure(pd.DataFrame(self.live), self.total))

    def _finished(self, result: QuantizeResult):
        self.result = result
        frame = result.report.to_frame()
        self.runner.set_progress(len(frame), len(frame))     # the bar ends on the layers, not the last phase
        frame.insert(0, "method", result.report.method)
        self.curve.show(layer_error_figure(frame, title=CURVE_TITLE, total_layers=len(frame)))
        self.kinds.show(kind_error_figure(frame))
        self.summary.value = summary_html(result.report)
        cols = [c for c in ("name", "rel_error", "attn_rel_error", "loss", "seconds") if c in frame.columns]
        self.table.value = table_html(frame.sort_values("rel_error", ascending=False)[cols].head(8))



def summary_html(report) -> str:
    cfg = report.config
    blocks = "all blocks" if not cfg.get("max_blocks") else f"first {cfg['max_blocks']} blocks"
    if report.ppl_fp is None or report.ppl_quant is None:
        ppl = "perplexity skipped"
    else:
        ppl = (f"perplexity {report.ppl_fp:.3f} &rarr; <b>{report.ppl_quant:.3f}</b> "
               f"({100 * (report.ppl_quant / report.ppl_fp - 1):+.1f}%)")
    return (f"<b>{report.method}</b> w{cfg.get('bits')} g{cfg.get('group_size')} on {blocks}: {ppl}, "
            f"quantization {report.quant_seconds:.1f} s, {len(report.layers)} layers")
