"""The Quantize tab: one method, live per-layer progress, perplexity, table and downloads."""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from .. import workspace
from ..errors import WorkbenchError
from ..figures import empty_figure, progress_figure
from ..figures.style import method_label
from ..methods import METHODS
from ..progress import progress_label
from . import text
from .form import Form, method_rows
from .plan_panel import build_plan_panel, connect_plan_run
from .report_button import build_report_button
from .try_panel import build_try_panel
from .views import (TabView, connect_cancel, empty_layers, error_text, file_stem, layer_display, message_html,
                    perplexity_markdown, progress_html, write_run_files)

PLOT_EVERY = 0.4   # seconds between plot refreshes while layers stream in
TITLE = "Relative output error per layer"
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class QuantizeView(TabView):
    plot: gr.Plot
    ppl: gr.Markdown
    table: gr.Dataframe
    files: gr.File


def build_quantize_tab(form: Form, session: gr.State, models: workspace.ModelCache,
                       start_method: str = "gptq", runs_dir: Path = Path("workbench-runs"),
                       plan_start: dict | None = None) -> QuantizeView:
    """``plan_start``: the Mixed precision panel's starting values (see ``plan_panel.build_plan_panel``)."""
    gr.Markdown(text.QUANTIZE)
    with gr.Row():
        method = gr.Radio([(method_label(m), m) for m in METHODS], value=start_method, label="Method",
                          elem_id="wb-method", scale=3)
        run = gr.Button("Run", variant="primary", elem_id="wb-run", scale=1)
        cancel = gr.Button("Cancel", variant="stop", elem_id="wb-cancel", scale=1)
    method_rows(form, start_method)
    plan, plan_controls = build_plan_panel(form, session, models, method, plan_start)
    view = QuantizeView(
        status=gr.HTML(elem_id="wb-q-status"),
        progress=gr.HTML(elem_id="wb-q-progress"),
        plot=gr.Plot(empty_figure(TITLE, "press Run to quantize"), label="Per-layer error", elem_id="wb-q-plot"),
        ppl=gr.Markdown(elem_id="wb-q-ppl"),
        table=gr.Dataframe(label="Per-layer results", elem_id="wb-q-table", interactive=False, max_height=360),
        files=gr.File(label="Report downloads (JSON, CSV)", file_count="multiple", elem_id="wb-q-files",
                      interactive=False))
    method.change(form.visibility, method, [c for c, _ in form.method_fields().values()], show_progress="hidden")

    def on_run(sess, m, *values):
        yield from stream_quantize(sess, models, form, view, m, values)

    run.click(on_run, [session, method, *form.inputs()], view.outputs(), show_progress="hidden",
              concurrency_limit=None)
    connect_cancel(cancel, session, view.status)
    connect_plan_run(plan, plan_controls, form, session, models, method, view, stream_config)
    view.plan_panel = plan, plan_controls       # not a field: the tab's outputs are its results
    build_report_button(session, "q", lambda sess: [sess.last_quantize],
                        lambda outcomes: file_stem(outcomes[0].config) + "-report")
    build_save_panel(session, models, runs_dir)
    build_try_panel(session, models)
    return view


def build_save_panel(session: gr.State, models: workspace.ModelCache, runs_dir: Path):
    """Save the last run's model under the operator's workspace folder, and offer it as a zip."""
    with gr.Accordion("Save the quantized model", open=False, elem_id="wb-save-panel"):
        gr.Markdown(f"Writes the last run in its **Format** (the form's setting: pack-quantized for transformers "
                    f"and vLLM, fake-quant float16, or gguf:TYPE for llama.cpp) into a folder under the app's "
                    f"workspace, `{runs_dir.name}/`: the same files as `workbench quantize --save`.")
        with gr.Row():
            folder = gr.Textbox(label="Folder name", placeholder="empty: named after the run", elem_id="wb-save-name",
                                scale=3)
            overwrite = gr.Checkbox(label="Replace an existing folder", value=False, elem_id="wb-save-overwrite")
            save = gr.Button("Save", elem_id="wb-save")
        status = gr.HTML(elem_id="wb-save-status")
        download = gr.File(label="Download (zip)", elem_id="wb-save-zip", interactive=False)

    def on_save(sess, name, replace, progress=gr.Progress()):
        try:
            return save_last_run(sess, models, runs_dir, name, replace, on_event=gradio_progress(progress))
        except WorkbenchError as exc:
            return message_html(str(exc), "error"), None

    save.click(on_save, [session, folder, overwrite], [status, download], show_progress="full")


def gradio_progress(progress: gr.Progress):
    """Progress events on Gradio's progress bar of the handler's outputs."""
    def on_event(ev):
        if ev.kind == "progress":
            progress((ev.index, ev.total), desc=ev.message, unit=ev.unit or "steps")
    return on_event


def save_last_run(sess, models: workspace.ModelCache, runs_dir: Path, name: str, replace: bool, on_event=None):
    outcome = sess.last_quantize
    if outcome is None:
        raise WorkbenchError("nothing to save yet: press Run first")
    name = (name or "").strip() or file_stem(outcome.config)
    if not FOLDER_NAME.fullmatch(name) or name in (".", ".."):
        raise WorkbenchError(f"Folder name {name!r} may hold letters, digits, '.', '-' and '_' only (no slashes), "
                             f"128 characters at most")
    if (runs_dir / name).exists() and not replace:   # said in the page's words, not the CLI's flag
        raise WorkbenchError(f"{runs_dir.name}/{name} exists already; tick 'Replace an existing folder' or choose "
                             f"another Folder name")
    runs_dir.mkdir(parents=True, exist_ok=True)
    info = workspace.save_outcome(outcome, runs_dir / name, overwrite=bool(replace), models=models, on_event=on_event)
    archive = shutil.make_archive(str(sess.files_dir() / name), "zip", root_dir=runs_dir, base_dir=name)
    note = (f"saved {outcome.config.format} to {runs_dir.name}/{name}: quantized layers {info.quantized_bytes / 1e6:.1f} MB "
            f"against {info.float16_bytes / 1e6:.1f} MB in float16 ({info.ratio:.2f}x smaller), "
            f"{info.total_bytes / 1e6:.1f} MB in all")
    return message_html(note, "ok"), archive


def finished_outputs(view: QuantizeView, sess, outcome, note: str) -> dict:
    layers = outcome.layers
    total = len(layers)
    files = write_run_files(sess.files_dir(), file_stem(outcome.config), [outcome])
    return {view.status: message_html(note, "ok"),
            view.progress: progress_html(total, total, f"{total} layers quantized", state="done"),
            view.plot: progress_figure(layers, total, title=f"{TITLE}: {method_label(outcome.method)}, {total} layers"),
            view.ppl: perplexity_markdown(outcome), view.table: layer_display(layers), view.files: files}


def stream_quantize(sess, models: workspace.ModelCache, form: Form, view: QuantizeView, method: str, values):
    """The Run handler: validate, start the worker, turn its messages into page updates."""
    try:
        config = form.config(values, method)
    except WorkbenchError as exc:
        yield {view.status: message_html(f"Invalid settings: {exc}", "error")}
        return
    yield from stream_config(sess, models, view, config)


def stream_config(sess, models: workspace.ModelCache, view: QuantizeView, config):
    """A checked config run on a worker, its messages turned into page updates (Run, and the Plan panel's
    Run with this plan)."""
    method = config.method
    cached = sess.cached(config)
    if cached is not None:
        sess.last_quantize = cached
        yield finished_outputs(view, sess, cached, "same settings as an earlier run: shown from this page's cache")
        return

    def work(post, cancel):
        return workspace.run(config, models=models, on_event=lambda ev: post("event", ev), cancel=cancel)

    try:
        job = sess.start(work, "quantize")
    except WorkbenchError as exc:
        yield {view.status: message_html(str(exc), "warn")}
        return
    rows, done, total, label, last_plot, plotted = [], 0, 0, "starting", 0.0, 0
    phase = None    # (done, total) of a measured phase (perplexity windows, held-out blocks): shown on the bar
    yield {view.status: message_html(f"running {method_label(method)}...", "info"),
           view.progress: progress_html(0, 1, label, 0),
           view.plot: empty_figure(TITLE, "waiting for the first layer"), view.ppl: "", view.table: empty_layers(),
           view.files: None}
    for msg in job.messages():
        elapsed = time.perf_counter() - job.started
        if msg is None:
            update = {view.progress: progress_html(*(phase or (done, total)), label, elapsed)}
            if len(rows) > plotted:   # a quiet moment: catch the plot up with throttled layers
                update[view.plot], plotted = progress_figure(pd.DataFrame(rows), total), len(rows)
            yield update
            continue
        if msg.kind == "event":
            ev = msg.payload
            if ev.kind == "progress":
                phase, label = (ev.index, ev.total), progress_label(ev)
            else:
                total, phase = ev.total or total, None
            if ev.kind == "phase":
                label = ev.message
            elif ev.kind == "layer_started":
                label = f"{method}: block {ev.block}, {ev.layer_kind} ({ev.index}/{ev.total})"
            elif ev.kind == "layer_finished":
                done = ev.index
                rows.append({"method": method, "name": ev.layer, "block": ev.block, "kind": ev.layer_kind,
                             "rel_error": ev.rel_error, "loss": ev.loss, "seconds": ev.seconds})
                label = f"{method}: {done}/{total} layers, last {ev.layer_kind}@{ev.block} error {ev.rel_error:.2e}"
        elif msg.kind == "result":
            sess.remember(msg.payload)
            sess.last_quantize = msg.payload
            yield finished_outputs(view, sess, msg.payload, f"{method_label(method)} finished in {elapsed:.0f} s")
            return
        elif msg.kind == "cancelled":
            yield {view.status: message_html(f"cancelled after {done} of {total} layers", "warn"),
                   view.progress: progress_html(done, total, "cancelled", elapsed, state="cancelled"),
                   view.plot: progress_figure(pd.DataFrame(rows), total, title=f"{TITLE}: cancelled")}
            return
        elif msg.kind == "error":
            yield {view.status: message_html(error_text(msg.payload), "error"),
                   view.progress: progress_html(done, total, "failed", elapsed, state="error")}
            return
        update = {view.progress: progress_html(*(phase or (done, total)), label, elapsed)}
        if len(rows) > plotted and time.perf_counter() - last_plot > PLOT_EVERY:
            update[view.plot], plotted = progress_figure(pd.DataFrame(rows), total), len(rows)
            last_plot = time.perf_counter()
        yield update
