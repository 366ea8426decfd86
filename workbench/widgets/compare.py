"""GPTQ, BoA and TurboBoA (RTN on request) side by side on the same settings."""
from __future__ import annotations

import ipywidgets as W
import pandas as pd

from .. import workspace
from ..figures import attention_heatmaps, empty_figure, kind_error_figure, layer_error_figure
from ..figures.style import method_label
from ..methods import METHODS
from ..workspace import Outcome
from .common import LiveFigure, RunWidget, SettingsForm, Throttle, table_html, shown_figure

DEFAULT_METHODS = ("gptq", "boa", "turboboa")
CURVES = "Relative output error per layer, one line per method"
HEATMAPS = "Attention error per head on held-out text (block x head)"
READINGS = (("after o_proj", "after_o"), ("before o_proj", "before_o"),
            ("after o_proj, propagated", "after_o_propagated"))


class CompareWidget(RunWidget):
    """Runs each chosen method on a private copy of the same model with the same settings.

    ``run()`` waits and returns ``outcomes`` (method -> ``Outcome`` with ``report``,
    ``reconstruction`` and a ``layers`` frame). Figures: ``figure`` (per-layer error curves,
    one trace per method, growing live), ``heatmaps_figure`` (block x head attention error, one
    panel per method on a shared color scale), ``kinds_figure``; ``summary`` is a frame.
    """

    run_label = "Compare"

    def __init__(self, methods=DEFAULT_METHODS, use_figure_widget: bool | None = None, plot_every: float = 0.5,
                 **settings):
        self.form = SettingsForm(methods=False, **settings)
        self.plot_every = plot_every
        self.methods = W.SelectMultiple(options=[(method_label(m), m) for m in METHODS], value=tuple(methods),
                                        description="methods", rows=len(METHODS))
        self.reading = W.Dropdown(options=READINGS, value="after_o", description="attention")
        self._setup_runner()
        self.curves = LiveFigure(empty_figure(CURVES, "press Compare"), use_figure_widget)
        self.kinds = LiveFigure(empty_figure("Mean error by layer kind", "after the first method"),
                                use_figure_widget)
        self.heatmaps = LiveFigure(empty_figure(HEATMAPS, "filled in as each method finishes"), use_figure_widget)
        self.table = W.HTML()
        self.outcomes: dict[str, Outcome] = {}
        self.live: list[dict] = []
        self.reading.observe(lambda _: self._draw_heatmaps(), names="value")
        super().__init__([self.form, W.HBox([self.methods, W.VBox([W.HBox([self.run_button, self.cancel_button]),
                                                                    self.runner.progress])]),
                          self.runner.status, self.table, self.curves.widget, self.reading, self.heatmaps.widget,
                          self.kinds.widget])

    figure = shown_figure("curves")
    heatmaps_figure = shown_figure("heatmaps")
    kinds_figure = shown_figure("kinds")

    @property
    def frame(self) -> pd.DataFrame:
        """Every finished method's layers, one frame with a ``method`` column."""
        if not self.outcomes:
            return pd.DataFrame()
        return pd.concat([o.layers for o in self.outcomes.values()], ignore_index=True)

    @property
    def summary(self) -> pd.DataFrame:
        return pd.DataFrame([o.summary() for o in self.outcomes.values()])

    def heads(self, method: str) -> pd.DataFrame:
        """Per-head held-out attention errors of one method (block, head, before_o, after_o...)."""
        return self.outcomes[method].reconstruction.heads

    def run(self, wait: bool = True, methods=None, **settings) -> dict[str, Outcome] | None:
        self.runner.check_idle()
        if settings:
            self.form.set(**settings)
        if methods is not None:
            self.methods.value = tuple(methods)
        chosen = [m for m in METHODS if m in self.methods.value]
        if not chosen:
            self.runner.say("choose at least one method", "error")
            return None
        configs = {m: self.form.config(m) for m in chosen}
        self.outcomes, self.live = {}, []
        self.curves.show(empty_figure(CURVES, "waiting for the first layer"))
        self.heatmaps.show(empty_figure(HEATMAPS, "filled in as each method finishes"))
        throttle = Throttle(self.plot_every)
        state = {"per_run": 0, "finished": 0}

        def on_event(method):
            def handle(ev):
                if ev.kind == "phase":
                    self.runner.say(ev.message)
                if ev.kind == "progress":   # the bar counts every method's layers; the phase's counts are said
                    self.runner.show_phase(ev, bar=False)
                if ev.kind != "layer_finished":
                    return
                state["per_run"] = ev.total
                self.live.append({"method": method, "name": ev.layer, "block": ev.block, "kind": ev.layer_kind,
                                  "rel_error": ev.rel_error})
                total = ev.total * len(chosen)
                self.runner.set_progress(state["finished"] * ev.total + ev.index, total)
                self.runner.say(f"{method_label(method)}: {ev.index}/{ev.total} layers")
                if throttle():
                    self._draw_curves(state["per_run"])
            return handle

        def work(cancel):
            for m in chosen:
                self.runner.say(f"{method_label(m)}: starting")
                outcome = workspace.run(configs[m], on_event=on_event(m), cancel=cancel)
                self.outcomes[m] = outcome
                self.live = [r for r in self.live if r["method"] != m]
                state["finished"] += 1
                self._draw_curves(state["per_run"])
                self._draw_heatmaps()
                self.kinds.show(kind_error_figure(self.frame))
                self.table.value = table_html(self.summary)
            return self.outcomes

        self.runner.start(work, lambda _: self._draw_curves(state["per_run"]), "comparing " + ", ".join(chosen))
        return self._finish(wait, lambda: self.outcomes)

    def _draw_curves(self, per_run: int):
        frames = [o.layers[["method", "name", "block", "kind", "rel_error"]] for o in self.outcomes.values()]
        if self.live:
            frames.append(pd.DataFrame(list(self.live)))
        if not frames:
            return
        self.curves.show(layer_error_figure(pd.concat(frames, ignore_index=True), title=CURVES,
                                            total_layers=per_run or None))

    def _draw_heatmaps(self):
        if not self.outcomes:
            return
        value = self.reading.value
        self.heatmaps.show(attention_heatmaps({m: o.reconstruction.heads for m, o in self.outcomes.items()}, value,
                                              title=f"{HEATMAPS}, {value}"))
