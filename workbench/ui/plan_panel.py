"""The Quantize tab's Mixed precision panel: a budget, Make plan, the plan's heatmap, pinned widths and
Run with this plan.

The budget, sensitivity, candidate widths, the fused-layer rule and the width overrides are the
declared mixed-precision settings (``config``), given fields of their own here; every other setting
comes from the shared form. Make plan runs ``planning.make_draft`` on a worker like any run
(cancellable, its progress on the panel's bar); the session keeps the draft with its measured costs,
so a new budget or a pinned layer is planned again at once. Run with this plan writes the plan into the
session's files and streams the run into the tab's results, then puts the measured perplexity beside
the predicted one.

Gradio's plot component reports no clicks (its only event is ``change``), so a click on a heatmap cell
is caught in the page: a script bound to plotly's own click event writes the cell (``KIND@BLOCK``) into a
hidden text field, whose change chooses that layer in the Layer menu. Layer and Bits then pin the width
with Pin this width, as an item of the Width overrides field (which can also be edited by hand); the
menus work the same without the click.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr

from .. import workspace
from ..config import DEFAULTS, PLAN_START, SETTINGS, QuantizeConfig, for_method
from ..errors import WorkbenchError
from ..figures import empty_figure, plan_figure
from ..figures.plan import TITLE
from ..figures.style import method_label
from ..mixed.overrides import BITS_RANGE
from ..planning import Draft, costs_key, describe, make_draft, pin_item
from ..progress import progress_label
from . import text
from .exposure import EXPOSURE
from .form import FACE, Form, component
from .views import TabView, connect_cancel, error_text, message_html, progress_html

FIELDS = ("avg_bits", "sensitivity", "sensitivity_samples", "candidate_bits", "split_fused", "keep_bits")
WIDTHS = [str(b) for b in range(BITS_RANGE[0], BITS_RANGE[1] + 1)]
# binds plotly's click on the heatmap (drawn anew by every plan) to the hidden field #wb-plan-cell
CELL_CLICKS = """() => {
  const bind = () => {
    const plot = document.querySelector('#wb-plan-plot .js-plotly-plot');
    if (!plot || !plot.on || plot.dataset.wbCellClicks) return;
    plot.dataset.wbCellClicks = '1';
    plot.on('plotly_click', (event) => {
      const point = event.points && event.points[0];
      const box = document.querySelector('#wb-plan-cell textarea, #wb-plan-cell input');
      if (!point || !box || point.z === null || point.z === undefined) return;
      box.value = point.x + '@' + point.y;
      box.dispatchEvent(new Event('input', {bubbles: true}));
    });
  };
  new MutationObserver(bind).observe(document.body, {childList: true, subtree: true});
  bind();
}"""


@dataclass
class PlanPanel(TabView):
    plot: gr.Plot
    summary: gr.Markdown
    layer: gr.Dropdown


@dataclass
class PlanControls:
    """The panel's inputs and buttons (its outputs are ``PlanPanel``)."""
    fields: dict             # setting name -> component, in ``FIELDS`` order
    bits: gr.Dropdown
    make: gr.Button
    pin: gr.Button
    run: gr.Button

    def inputs(self) -> list:
        return list(self.fields.values())


def build_plan_panel(form: Form, session: gr.State, models: workspace.ModelCache, method: gr.Radio,
                     start: dict | None = None) -> tuple[PlanPanel, PlanControls]:
    """The panel, its Make plan and pin handlers connected; ``connect_plan_run`` connects its Run once the
    tab's results exist. ``start``: the panel's starting values by setting name (over ``PLAN_START``)."""
    values = {**DEFAULTS, **PLAN_START, **(start or {})}
    with gr.Accordion("Mixed precision: a width per layer", open=False, elem_id="wb-plan-panel"):
        gr.Markdown(text.PLAN)
        with gr.Row(equal_height=True):
            # the budget gets the room a slider needs to be set to a twentieth of a bit
            fields = {n: component(SETTINGS[n], values[n], scale=2 if n == "avg_bits" else 1)
                      for n in FIELDS if n != "keep_bits"}
        with gr.Row():
            make = gr.Button("Make plan", variant="primary", elem_id="wb-plan-make", scale=2)
            cancel = gr.Button("Cancel", variant="stop", elem_id="wb-plan-cancel", scale=1)
            run = gr.Button("Run with this plan", variant="primary", elem_id="wb-plan-run", scale=2)
        panel = PlanPanel(status=gr.HTML(elem_id="wb-plan-status"), progress=gr.HTML(elem_id="wb-plan-progress"),
                          plot=gr.Plot(empty_figure(TITLE, "press Make plan"), label="Plan", elem_id="wb-plan-plot"),
                          summary=gr.Markdown(elem_id="wb-plan-summary"),
                          layer=gr.Dropdown([], label="Layer", elem_id="wb-plan-layer", scale=2, render=False,
                                            info="a layer of the plan to pin at a width; or click its cell in "
                                                 "the heatmap"))
        with gr.Row():
            panel.layer.render()
            bits = gr.Dropdown(WIDTHS, value=WIDTHS[-1], label="Bits", elem_id="wb-plan-bits", scale=1, min_width=90)
            pin = gr.Button("Pin this width", elem_id="wb-plan-pin", scale=1, size="md")
            fields["keep_bits"] = component(SETTINGS["keep_bits"], values["keep_bits"], scale=3)
        cell = gr.Textbox(visible="hidden", elem_id="wb-plan-cell")
    controls = PlanControls(fields, bits, make, pin, run)
    outputs = [panel.status, panel.progress, panel.plot, panel.summary, panel.layer]

    def on_make(sess, m, *raw):
        yield from stream_plan(sess, models, form, panel, m, raw[len(FIELDS):], dict(zip(FIELDS, raw)))

    def on_budget(sess, m, *raw):
        yield from replan(sess, models, form, panel, m, raw[len(FIELDS):], dict(zip(FIELDS, raw)))

    def on_pin(sess, m, layer, width, *raw):
        yield from stream_pin(sess, models, form, panel, controls, m, layer, width, raw[len(FIELDS):],
                              dict(zip(FIELDS, raw)))

    inputs = [session, method, *controls.inputs(), *form.inputs()]
    make.click(on_make, inputs, outputs, show_progress="hidden", concurrency_limit=None)
    fields["avg_bits"].release(on_budget, inputs, outputs, show_progress="hidden", concurrency_limit=None)
    pin.click(on_pin, [session, method, panel.layer, bits, *controls.inputs(), *form.inputs()],
              outputs + [fields["keep_bits"]], show_progress="hidden", concurrency_limit=None)
    connect_cancel(cancel, session, panel.status)
    gr.on(None, None, None, None, js=CELL_CLICKS)
    cell.change(clicked_layer, [session, cell], panel.layer, show_progress="hidden")
    return panel, controls


def connect_plan_run(panel: PlanPanel, controls: PlanControls, form: Form, session: gr.State,
                     models: workspace.ModelCache, method: gr.Radio, view, stream):
    """Run with this plan: its run streams into ``view`` (the Quantize tab's results) through ``stream``
    (the tab's ``stream_config``)."""
    def on_run(sess, m, *values):
        yield from stream_plan_run(sess, models, form, view, panel, m, values, stream)

    controls.run.click(on_run, [session, method, *form.inputs()], view.outputs() + [panel.status, panel.summary],
                       show_progress="hidden", concurrency_limit=None)


# -- the handlers (called directly by the tests) ------------------------------------------------------

def plan_config(form: Form, values, method: str, mixed: dict) -> QuantizeConfig:
    """The form's settings with the panel's: the plan's budget replaces the Bits field."""
    merged = {**form.values(values), "bits": DEFAULTS["bits"], **mixed}
    return EXPOSURE.check(for_method(merged, method, FACE), FACE)


def stream_plan(sess, models: workspace.ModelCache, form: Form, panel: PlanPanel, method: str, values, mixed: dict):
    """Make plan: validate, measure and allocate on a worker (or allocate at once on the session's costs)."""
    try:
        cfg = plan_config(form, values, method, mixed)
    except WorkbenchError as exc:
        yield {panel.status: message_html(f"Invalid settings: {exc}", "error")}
        return
    known = sess.plan_draft

    def work(post, cancel):
        return make_draft(cfg, models=models, known=known, on_event=lambda ev: post("event", ev), cancel=cancel,
                          face=FACE)

    try:
        job = sess.start(work, "plan")
    except WorkbenchError as exc:
        yield {panel.status: message_html(str(exc), "warn")}
        return
    label, phase = "starting", (0, 1)
    yield {panel.status: message_html(f"planning {len(cfg.candidates())} widths per layer...", "info"),
           panel.progress: progress_html(*phase, label, 0)}
    for msg in job.messages():
        elapsed = time.perf_counter() - job.started
        if msg is not None and msg.kind == "event":
            ev = msg.payload
            if ev.kind == "progress":
                phase, label = (ev.index, ev.total), progress_label(ev)
            elif ev.kind == "phase":
                label = ev.message
        elif msg is not None and msg.kind == "result":
            sess.plan_draft = msg.payload
            yield finished_plan(panel, msg.payload, elapsed)
            return
        elif msg is not None and msg.kind == "cancelled":
            yield {panel.status: message_html("planning cancelled; the plan shown is the one made before", "warn"),
                   panel.progress: progress_html(*phase, "cancelled", elapsed, state="cancelled")}
            return
        elif msg is not None and msg.kind == "error":
            kept = "; the plan shown is the one made before" if sess.plan_draft is not None else ""
            yield {panel.status: message_html(error_text(msg.payload) + kept, "error"),
                   panel.progress: progress_html(*phase, "failed", elapsed, state="error")}
            return
        yield {panel.progress: progress_html(*phase, label, elapsed)}


def finished_plan(panel: PlanPanel, draft: Draft, elapsed: float) -> dict:
    how = (f"sensitivity of {len(draft.layers)} layers measured in {draft.seconds:.1f} s" if draft.seconds
           else "from the costs measured before")
    return {panel.status: message_html(f"planned in {elapsed:.1f} s ({how})", "ok"),
            panel.progress: progress_html(1, 1, "planned", elapsed, state="done"),
            panel.plot: draft_figure(draft), panel.summary: summary_markdown(draft),
            panel.layer: gr.update(choices=layer_choices(draft), value=None)}


def replan(sess, models, form: Form, panel: PlanPanel, method: str, values, mixed: dict):
    """The budget moved: planned again at once when the session's costs fit the settings, else said."""
    draft = sess.plan_draft
    try:
        cfg = plan_config(form, values, method, mixed)
    except WorkbenchError as exc:
        yield {panel.status: message_html(f"Invalid settings: {exc}", "error")}
        return
    if draft is None or costs_key(draft.config) != costs_key(cfg):
        yield {panel.status: message_html(f"{SETTINGS['avg_bits'].label} {cfg.avg_bits}: press Make plan to plan it",
                                          "info")}
        return
    yield from stream_plan(sess, models, form, panel, method, values, mixed)


def clicked_layer(sess, cell: str):
    """The heatmap cell clicked (``KIND@BLOCK``) as the Layer menu's choice, when it is a layer of the plan."""
    draft = sess.plan_draft
    if draft is None or cell not in {value for _, value in layer_choices(draft)}:
        return gr.skip()
    return gr.update(value=cell)


def stream_pin(sess, models, form: Form, panel: PlanPanel, controls: PlanControls, method: str, layer, bits, values,
               mixed: dict):
    """Pin this width: the layer's override added, then planned again; the field changes only when the
    plan with the pin is made, so a pin the budget cannot take leaves the field as it was."""
    try:
        keep = pin_item(mixed.get("keep_bits", ""), layer, bits)
    except WorkbenchError as exc:
        yield {panel.status: message_html(str(exc), "error")}
        return
    before = sess.plan_draft
    yield from stream_plan(sess, models, form, panel, method, values, {**mixed, "keep_bits": keep})
    if sess.plan_draft is not before:
        yield {controls.fields["keep_bits"]: keep}


def stream_plan_run(sess, models, form: Form, view, panel: PlanPanel, method: str, values, stream):
    """Run with this plan: the plan file written, the run streamed into ``view`` by ``stream(sess, models,
    view, config)``, then the measured perplexity set beside the predicted one."""
    draft = sess.plan_draft
    if draft is None:
        yield {panel.status: message_html("there is no plan yet: press Make plan first", "error")}
        return
    try:
        cfg = draft.run_config(form.config(values, method), sess.files_dir(), FACE)
    except WorkbenchError as exc:
        yield {panel.status: message_html(f"Invalid settings: {exc}", "error")}
        return
    yield {panel.status: message_html(f"running {method_label(method)} with the plan: its progress and results are "
                                      f"below the panel", "info")}
    yield from stream(sess, models, view, cfg)
    outcome = sess.last_quantize
    if outcome is not None and outcome.config == cfg:
        yield {panel.status: message_html(f"{method_label(method)} ran with the plan", "ok"),
               panel.summary: summary_markdown(draft, outcome)}
    else:
        yield {panel.status: message_html("the run with the plan did not finish: see the results below", "warn")}


# -- what the panel shows ----------------------------------------------------------------------------------

def draft_figure(draft: Draft):
    cfg = draft.config
    return plan_figure(draft.table(), list(draft.kinds), cost_label=f"{cfg.sensitivity} cost",
                       title=f"{TITLE}: {draft.summary()['avg_bits']:.2f} bits per weight")


def layer_choices(draft: Draft) -> list[tuple[str, str]]:
    return [(f"block {l.block} · {l.kind} ({draft.bits[l.name]} bits)", f"{l.kind}@{l.block}") for l in draft.layers]


def summary_markdown(draft: Draft, outcome=None) -> str:
    """The plan beside its budget, the predicted perplexity change and, after a run, the measured one."""
    return "\n\n".join(f"**{head}:** {body.replace('->', '&rarr;')}"
                        for head, body in describe(draft, None if outcome is None else outcome.report))
