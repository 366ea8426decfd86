"""The Inspect tab: Hessian spectra of one layer and its heads, conditioning across layers, error vs spectrum."""
from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from .. import workspace
from ..errors import WorkbenchError
from ..data import calibration_windows
from ..diagnostics.outliers import outliers_before_after
from ..figures import (condition_heatmap, empty_figure, error_vs_spectrum, head_spectra_figure, outlier_figure,
                       spectrum_figure)
from ..progress import progress_label
from . import text
from .form import Form
from .views import TabView, error_text, message_html, progress_html

SUMMARIES = [("condition number", "condition"), ("condition (damped, as the solver sees it)", "condition_damped"),
             ("effective rank", "effective_rank"), ("top-1% share of the trace", "top1_share")]
FACTORS = [("q: H_out per query head", "q"), ("k: H_out per KV head", "k"), ("v: H_in per KV head", "v")]
OUTLIER_INPUTS = [("q, k, v (attention input)", "q"), ("o (attention output)", "o"), ("gate, up (MLP input)", "gate"),
                  ("down (MLP hidden)", "down")]
OUTLIER_WINDOWS = 4        # calibration windows the picture is taken on: maxima settle within a few
ERRORS = [("calibration error (report)", "rel_error"), ("held-out error", "heldout_rel_error")]


@dataclass
class InspectView(TabView):
    layer: gr.Dropdown
    spectrum: gr.Plot
    heads: gr.Plot
    heatmap: gr.Plot
    scatter: gr.Plot


def build_inspect_tab(form: Form, session: gr.State, models: workspace.ModelCache) -> tuple[InspectView, callable]:
    gr.Markdown(text.INSPECT)
    with gr.Row():
        compute = gr.Button("Compute spectra", variant="primary", elem_id="wb-i-run", scale=1)
        layer = gr.Dropdown([], label="Layer", elem_id="wb-i-layer", scale=3, interactive=True)
        factor = gr.Radio(FACTORS, value="q", label="Per-head factor", elem_id="wb-i-factor", scale=2)
    status = gr.HTML(elem_id="wb-i-status")
    progress = gr.HTML(elem_id="wb-i-progress")
    with gr.Row():
        spectrum = gr.Plot(empty_figure("H_in spectrum", "press Compute spectra"), elem_id="wb-i-spectrum",
                           label="Layer spectrum")
        heads = gr.Plot(empty_figure("Per-head spectra", "press Compute spectra"), elem_id="wb-i-heads",
                        label="Per-head spectra")
    with gr.Row():
        summary = gr.Radio(SUMMARIES, value="condition", label="Spectrum summary", elem_id="wb-i-summary", scale=2)
        err = gr.Radio(ERRORS, value="rel_error", label="Error", elem_id="wb-i-error", scale=1)
    with gr.Row():
        heatmap = gr.Plot(empty_figure("Condition number across layers", "press Compute spectra"),
                          elem_id="wb-i-heatmap", label="Across layers")
        scatter = gr.Plot(empty_figure("Error against spectrum", "needs spectra and a quantization run"),
                          elem_id="wb-i-scatter", label="Error vs spectrum")
    view = InspectView(status, progress, layer, spectrum, heads, heatmap, scatter)

    gr.Markdown(text.OUTLIERS)
    with gr.Row():
        o_run = gr.Button("Show activation outliers", elem_id="wb-i-outliers-run", scale=1)
        o_block = gr.Number(0, precision=0, minimum=0, label="Block", elem_id="wb-i-outliers-block", scale=1)
        o_kind = gr.Dropdown(OUTLIER_INPUTS, value="q", label="Input of", elem_id="wb-i-outliers-kind", scale=2)
        o_rotate = gr.Radio(["hadamard", "random"], value="hadamard", label="Rotation", elem_id="wb-i-outliers-rot",
                            scale=1)
    o_status = gr.HTML(elem_id="wb-i-outliers-status")
    o_plot = gr.Plot(empty_figure("Activation outliers", "press Show activation outliers"), elem_id="wb-i-outliers",
                     label="Activation outliers")

    def on_outliers(block, kind, rotate, *values):
        return show_outliers(models, form, block, kind, rotate, values)

    o_run.click(on_outliers, [o_block, o_kind, o_rotate, *form.inputs()], [o_status, o_plot], show_progress="hidden")

    def on_compute(sess, layer_name, fac, summ, e, *values):
        yield from stream_spectra(sess, models, form, view, layer_name, fac, summ, e, values)

    compute.click(on_compute, [session, layer, factor, summary, err, *form.inputs()], view.outputs(),
                  show_progress="hidden", concurrency_limit=None)
    layer.change(layer_figures, [session, layer, factor], [spectrum, heads], show_progress="hidden")
    factor.change(layer_figures, [session, layer, factor], [spectrum, heads], show_progress="hidden")
    summary.change(across_figures, [session, summary, err], [heatmap, scatter], show_progress="hidden")
    err.change(across_figures, [session, summary, err], [heatmap, scatter], show_progress="hidden")

    def refresh(sess, summ, e):   # new runs may have finished in other tabs since the last look
        return across_figures(sess, summ, e)
    return view, (refresh, [session, summary, err], [heatmap, scatter])


def show_outliers(models: workspace.ModelCache, form: Form, block, kind, rotate, values):
    """(status, figure): the channel maxima of ``kind``'s input in ``block``, before and after ``rotate``."""
    try:
        config = form.config(values, "gptq")
        shared = models.get(config.model)
        ids = calibration_windows(shared.tokenizer, config.calib, min(config.calib_samples, OUTLIER_WINDOWS),
                                  config.seqlen, config.seed)
        found = outliers_before_after(shared.working_copy(), int(block or 0), kind, ids, rotate, config.seed,
                                      config.batch_size, in_place=True)
    except WorkbenchError as exc:
        return message_html(error_text(exc), "error"), empty_figure("Activation outliers", "see the message above")
    sizes = ", ".join(f"{k} {v}" for k, v in found["rotation"].items())
    title = f"Input of {kind}, block {int(block or 0)}: max |x| per channel"
    return (message_html(f"{ids.shape[0]} calibration windows of {config.seqlen} tokens; rotation: {sizes}", "ok"),
            outlier_figure(found["before"], found["after"], title))


def _block_of(spectra, name):
    rows = spectra.layers[spectra.layers["name"] == name]
    return int(rows["block"].iloc[0]) if len(rows) else 0


def layer_figures(sess, name, factor):
    current = sess.current_spectra
    if current is None or not name:
        return (empty_figure("H_in spectrum", "press Compute spectra"),
                empty_figure("Per-head spectra", "press Compute spectra"))
    _, spectra = current
    block = _block_of(spectra, name)
    stage = spectra.layers.loc[spectra.layers["name"] == name, "stage"].iloc[0]
    same_kind = spectra.layers[(spectra.layers["kind"] == spectra.layers.loc[
        spectra.layers["name"] == name, "kind"].iloc[0]) & (spectra.layers["name"] != name)]
    # the chosen layer against the first and last of its kind, normalized, to show how depth changes the shape
    others = [n for n in (same_kind["name"].iloc[[0, -1]].tolist() if len(same_kind) else []) if n != name]
    names = [name, *dict.fromkeys(others)]
    short = name.split(f".{block}.", 1)[-1]
    shared = f" (input shared by {stage.replace(',', ', ')})" if "," in stage else ""
    spec = spectrum_figure(spectra.layer_eigenvalues, names, normalize=len(names) > 1,
                           title=f"H_in spectrum, block {block} {short}{shared}")
    fac = "H_in" if factor == "v" else "H_out"
    heads = head_spectra_figure(spectra.head_eigenvalues, block, factor, factor=fac,
                                title=f"Per-head {fac} spectra, block {block}, {factor}")
    return spec, heads


def error_frame(sess, model: str) -> pd.DataFrame | None:
    outcomes = sess.outcomes_for(model)
    if not outcomes:
        return None
    return pd.concat([o.layers for o in outcomes], ignore_index=True)


def across_figures(sess, summary, err):
    current = sess.current_spectra
    if current is None:
        return (empty_figure("Condition number across layers", "press Compute spectra"),
                empty_figure("Error against spectrum", "needs spectra and a quantization run"))
    config, spectra = current
    label = dict((v, k) for k, v in SUMMARIES)[summary]
    heat = condition_heatmap(spectra.layers, summary, title=f"{label[0].upper() + label[1:]} of H_in across layers")
    scatter = error_vs_spectrum(spectra.layers, error_frame(sess, config.model), x=summary, y=err)
    return heat, scatter


def stream_spectra(sess, models: workspace.ModelCache, form: Form, view: InspectView, layer_name, factor, summary,
                   err, values):
    try:   # the spectra are of the full-precision model: the method only decides which fields apply
        config = form.config(values, "gptq")
    except WorkbenchError as exc:
        yield {view.status: message_html(f"Invalid settings: {exc}", "error")}
        return

    def finish(spectra, note):
        sess.remember_spectra(config, spectra)
        names = spectra.layers["name"].tolist()
        chosen = layer_name if layer_name in names else (names[0] if names else None)
        spec, heads = layer_figures(sess, chosen, factor)
        heat, scatter = across_figures(sess, summary, err)
        n = spectra.layers["block"].nunique() if len(spectra.layers) else 0
        return {view.status: message_html(note, "ok"),
                view.progress: progress_html(n, n, f"{n} blocks", state="done"),
                view.layer: gr.Dropdown(choices=names, value=chosen), view.spectrum: spec, view.heads: heads,
                view.heatmap: heat, view.scatter: scatter}

    hit = sess.cached_spectra(config)
    if hit is not None:
        yield finish(hit, "spectra for these settings shown from this page's cache")
        return
    try:
        job = sess.start(lambda post, cancel: workspace.spectra(config, models=models, cancel=cancel,
                                                                on_event=lambda ev: post("event", ev)), "spectra")
    except WorkbenchError as exc:
        yield {view.status: message_html(str(exc), "warn")}
        return
    label, done, total = f"loading {config.model}", 0, 0
    yield {view.status: message_html("computing spectra of the full-precision model...", "info"),
           view.progress: progress_html(0, 1, label, 0)}
    for msg in job.messages():
        elapsed = time.perf_counter() - job.started
        if msg is None:
            pass
        elif msg.kind == "event" and msg.payload.kind == "phase":
            label = msg.payload.message
        elif msg.kind == "event" and msg.payload.kind == "progress":    # the embedded model's first conversion
            done, total, label = msg.payload.index, msg.payload.total, progress_label(msg.payload)
        elif msg.kind == "event":
            done, total = msg.payload.index, msg.payload.total
            label = f"block {done} of {total}"
        elif msg.kind == "result":
            yield finish(msg.payload, f"spectra of {done} blocks in {elapsed:.0f} s")
            return
        elif msg.kind in ("cancelled", "error"):
            note = "cancelled" if msg.kind == "cancelled" else error_text(msg.payload)
            yield {view.status: message_html(note, "warn" if msg.kind == "cancelled" else "error"),
                   view.progress: progress_html(done, total, msg.kind, elapsed, state="error")}
            return
        yield {view.progress: progress_html(done, max(total, 1), label, elapsed)}
