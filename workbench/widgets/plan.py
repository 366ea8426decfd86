"""Mixed precision in a notebook: a budget, Make plan, the plan's heatmap, pinned widths, Run with this plan.

The same plan as the app's Mixed precision panel (``workbench.planning``): the budget, sensitivity,
candidate widths, fused-layer rule and width overrides are the declared settings, here as widgets of
their own beside the settings form. Clicking a heatmap cell (with ``anywidget``, whose figures take
clicks) chooses that layer for Pin.
"""
from __future__ import annotations

import html
import tempfile
from pathlib import Path

import ipywidgets as W

from .. import workspace
from ..api import QuantizeResult
from ..config import DEFAULTS, PLAN_START, SETTINGS, QuantizeConfig, for_method
from ..errors import WorkbenchError
from ..figures import empty_figure, plan_figure
from ..figures.plan import TITLE
from ..mixed.overrides import BITS_RANGE
from ..mixed.plan import write_plan
from ..planning import Draft, costs_key, describe, make_draft, pin_item
from .common import FACE, STYLE, LiveFigure, RunWidget, SettingsForm, setting_widget, shown_figure

FIELDS = ("avg_bits", "sensitivity", "sensitivity_samples", "candidate_bits", "split_fused", "keep_bits")
WIDTHS = [str(b) for b in range(BITS_RANGE[0], BITS_RANGE[1] + 1)]


def budget_slider(value: float) -> W.FloatSlider:
    """The budget as a slider, its label, range and step from the setting's declaration."""
    s = SETTINGS["avg_bits"]
    return W.FloatSlider(value=value, min=s.low, max=s.high, step=s.step, description=s.label, style=STYLE,
                         continuous_update=False, readout_format=".2f", layout=W.Layout(width="520px"))


class PlanWidget(RunWidget):
    """Make plan measures each layer's cost at every candidate width and spends the budget; the heatmap
    shows the widths (blocks down, layer kinds across). A new budget or a pinned width is planned again at
    once from the costs already measured. Run with this plan quantizes with it.

    Programmatic use::

        w = PlanWidget(model="smollm2-135m", method="gptq", avg_bits=3.5)
        draft = w.run()              # Make plan (waits); w.figure is the heatmap, w.table the widths
        w.pin("down@0", 8)           # pin a layer (KIND@BLOCK) and plan again
        result = w.run_plan()        # quantize with the plan; w.result.report.ppl_quant

    ``draft``: the ``planning.Draft`` shown; ``result``: the ``QuantizeResult`` of the last plan run.
    """

    run_label = "Make plan"

    def __init__(self, use_figure_widget: bool | None = None, **settings):
        mixed = {n: settings.pop(n) for n in FIELDS if n in settings}
        # settings of neither form (the size budget in MB, a plan file) would be dropped without a word
        absent = [n for n in settings if n in SETTINGS and FACE not in SETTINGS[n].faces]
        if absent:
            raise WorkbenchError(f"the PlanWidget has no field {', '.join(absent)}; its plan's fields are "
                                 f"{', '.join(FIELDS)}, the rest is the settings form's")
        values = {**DEFAULTS, **PLAN_START, **{n: SETTINGS[n].parse(v, FACE) for n, v in mixed.items()}}
        if values["avg_bits"] is None:
            raise WorkbenchError(f"{SETTINGS['avg_bits'].label} is the plan's budget; give a number from "
                                 f"{SETTINGS['avg_bits'].low} to {SETTINGS['avg_bits'].high}")
        self.form = SettingsForm(**settings)
        self.fields = {"avg_bits": budget_slider(values["avg_bits"]),
                       **{n: setting_widget(SETTINGS[n], values[n]) for n in FIELDS[1:]}}
        self._setup_runner()
        self.run_plan_button = W.Button(description="Run with this plan", button_style="success", icon="play")
        self.layer = W.Dropdown(options=[], description="Layer", style=STYLE)
        self.bits = W.Dropdown(options=WIDTHS, value=WIDTHS[-1], description="Bits", style=STYLE,
                               layout=W.Layout(width="200px"))
        self.pin_button = W.Button(description="Pin this width", icon="thumb-tack")
        self.heatmap = LiveFigure(empty_figure(TITLE, "press Make plan"), use_figure_widget)
        self.summary = W.HTML()
        self.draft: Draft | None = None
        self.result: QuantizeResult | None = None
        self._quiet = False          # the budget set from code: no re-plan of its own
        # the plan files its runs read: this widget's own, gone with it
        self._files = tempfile.TemporaryDirectory(prefix="workbench-plans-")
        self.run_plan_button.on_click(lambda _: self._click(self.run_plan))
        self.pin_button.on_click(lambda _: self._click(self.pin))
        self.fields["avg_bits"].observe(lambda _: self._budget_moved(), names="value")
        super().__init__([self.form, W.VBox(list(self.fields.values())),
                          self.buttons(self.run_plan_button), self.runner.status, self.heatmap.widget,
                          W.HBox([self.layer, self.bits, self.pin_button]), self.summary])

    figure = shown_figure("heatmap", "the plan's heatmap (``LiveFigure.figure``)")

    @property
    def table(self):
        """One row per layer of the plan shown: name, block, kind, bits, cost, pinned, cost per candidate."""
        return None if self.draft is None else self.draft.table()

    @property
    def bits_by_layer(self) -> dict[str, int] | None:
        return None if self.draft is None else dict(self.draft.bits)

    # -- settings ------------------------------------------------------------------------------------
    def _set(self, **settings):
        mine = {k: settings.pop(k) for k in list(settings) if k in self.fields}
        if settings:
            self.form.set(**settings)
        self._quiet = True
        try:
            for k, v in mine.items():
                s = SETTINGS[k]
                shown = s.form_value(s.parse(v, FACE))
                w = self.fields[k]
                w.value = shown if isinstance(w, (W.Dropdown, W.Checkbox, W.FloatSlider)) else str(shown)
        finally:
            self._quiet = False

    def plan_config(self, overrides: str | None = None) -> QuantizeConfig:
        """The form's settings with the plan's (the budget replaces the form's bits)."""
        values = {**self.form.values(), "bits": DEFAULTS["bits"], **{n: w.value for n, w in self.fields.items()}}
        if overrides is not None:
            values["keep_bits"] = overrides
        return for_method(values, values.get("method", self.form.method_name), FACE)

    # -- making the plan -------------------------------------------------------------------------------
    def run(self, wait: bool = True, **settings) -> Draft | None:
        """Make plan with the widgets' settings (``settings`` set fields first, the plan's or the form's)."""
        self.runner.check_idle()
        if settings:
            self._set(**settings)
        return self._make(self.plan_config(), wait)

    make = run

    def pin(self, layer: str | None = None, bits: int | None = None, wait: bool = True) -> Draft | None:
        """Pin ``layer`` (``KIND@BLOCK``, default the Layer menu's) at ``bits`` (default the Bits menu's) and
        plan again; the overrides field takes the pin once the plan with it is made."""
        self.runner.check_idle()
        keep = pin_item(self.fields["keep_bits"].value, layer or self.layer.value, bits or self.bits.value)
        return self._make(self.plan_config(keep), wait, keep)

    def _make(self, cfg: QuantizeConfig, wait: bool, keep: str | None = None):
        known = self.draft

        def on_event(ev):
            if ev.kind == "phase":
                self.runner.say(ev.message)
            elif ev.kind == "progress":
                self.runner.show_phase(ev)

        def done(draft: Draft):
            self.draft = draft
            if keep is not None:
                self._quiet = True
                self.fields["keep_bits"].value = keep
                self._quiet = False
            self._draw()

        self.runner.start(lambda cancel: make_draft(cfg, known=known, on_event=on_event, cancel=cancel, face=FACE),
                          done, f"planning {cfg.model}")
        return self._finish(wait, lambda: self.draft)

    def _budget_moved(self):
        """A new budget is planned at once when the costs measured fit the settings (else Make plan does it)."""
        if self._quiet or self.draft is None or self.runner.running:
            return
        try:
            cfg = self.plan_config()
        except WorkbenchError as exc:
            self.runner.say(str(exc), "error")
            return
        if costs_key(cfg) == costs_key(self.draft.config):
            self._make(cfg, wait=False)

    def _draw(self):
        draft = self.draft
        self.heatmap.show(plan_figure(draft.table(), list(draft.kinds), cost_label=f"{draft.config.sensitivity} cost",
                                      title=f"{TITLE}: {draft.summary()['avg_bits']:.2f} bits per weight"))
        self.heatmap.on_click(self._cell_clicked)
        self.layer.options = [(f"block {l.block} · {l.kind} ({draft.bits[l.name]} bits)", f"{l.kind}@{l.block}")
                              for l in draft.layers]
        self._describe()

    def _cell_clicked(self, kind, block):
        choice = f"{kind}@{int(block)}"
        if choice in [v for _, v in self.layer.options]:
            self.layer.value = choice

    def _describe(self, report=None):
        self.summary.value = "<br>".join(f"<b>{html.escape(head)}:</b> {html.escape(body)}"
                                         for head, body in describe(self.draft, report))

    def save_plan(self, path) -> Path:
        """The plan shown as a JSON file (what ``--plan`` reads, as ``--plan-out`` writes it)."""
        if self.draft is None:
            raise WorkbenchError("there is no plan yet: press Make plan first")
        return write_plan(path, self.draft.plan)

    # -- running it --------------------------------------------------------------------------------------
    def run_plan(self, wait: bool = True, method: str | None = None) -> QuantizeResult | None:
        """Quantize with the plan shown, ``method`` (default the form's) on the form's settings."""
        self.runner.check_idle()
        if self.draft is None:
            raise WorkbenchError("there is no plan yet: press Make plan first")
        cfg = self.draft.run_config(self.form.config(method), self._files.name, FACE)
        self.result = None

        def on_event(ev):
            self.runner.follow(ev, f"{cfg.method} with the plan")

        def done(result: QuantizeResult):
            self.result = result
            self._describe(result.report)

        self.runner.start(lambda cancel: workspace.quantize_copy(cfg, on_event=on_event, cancel=cancel), done,
                          f"{cfg.method} with the plan")
        return self._finish(wait, lambda: self.result)

    def _click(self, action):
        try:
            action(wait=False)
        except Exception as exc:
            self.runner.say(str(exc) if isinstance(exc, WorkbenchError) else f"{type(exc).__name__}: {exc}", "error")
