"""The Compare tab: RTN, GPTQ, BoA and TurboBoA on the same settings, filling in live."""
from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from .. import workspace
from ..errors import Cancelled, WorkbenchError
from ..figures import attention_heatmaps, empty_figure, layer_error_figure
from ..figures.style import method_label
from ..methods import METHODS
from ..progress import progress_label
from . import text
from .form import FACE, Form
from .report_button import build_report_button
from .try_panel import build_compare_try_panel
from .views import TabView, connect_cancel, error_text, message_html, progress_html, summary_display, write_run_files

COMPARE_METHODS = ("rtn", "gptq", "boa", "turboboa")
MIXED = "mixed"      # the row of the Plan panel's plan, run with one method
NO_MIXED = ""

PLOT_EVERY = 0.5
CURVES = "Relative output error per layer, one line per method"
HEATMAPS = "Attention error per head on held-out text (block x head)"
READINGS = [("after o_proj (head's share of the residual)", "after_o"), ("before o_proj (head output)", "before_o")]


@dataclass
class CompareView(TabView):
    curves: gr.Plot
    heatmaps: gr.Plot
    table: gr.Dataframe
    files: gr.File


def build_compare_tab(form: Form, session: gr.State, models: workspace.ModelCache,
                      ray_address: str | None = None) -> CompareView:
    """``ray_address`` (``local`` or a cluster's address): the four methods run at once as Ray tasks."""
    gr.Markdown(text.COMPARE)
    if ray_address:
        gr.Markdown(text.COMPARE_ON_RAY.format(address=ray_address))
    with gr.Row():
        label = "Run all four methods" + (" on Ray" if ray_address else "")
        run = gr.Button(label, variant="primary", elem_id="wb-compare-run", scale=2)
        cancel = gr.Button("Cancel", variant="stop", elem_id="wb-compare-cancel", scale=1)
        mixed = gr.Dropdown([("no mixed row", NO_MIXED)] + [(f"the plan with {method_label(m)}", m) for m in METHODS],
                            value=NO_MIXED, label="Mixed row", elem_id="wb-compare-mixed", scale=2,
                            info="one more row: the plan of the Quantize tab's Mixed precision panel, run with this "
                                 "method on the same settings")
    view = CompareView(
        status=gr.HTML(elem_id="wb-c-status"),
        progress=gr.HTML(elem_id="wb-c-progress"),
        table=gr.Dataframe(label="Perplexity and time", elem_id="wb-c-table", interactive=False),
        curves=gr.Plot(empty_figure(CURVES, "press Run to compare"), label="Per-layer error", elem_id="wb-c-curves"),
        heatmaps=gr.Plot(empty_figure(HEATMAPS, "filled in as each method finishes"), label="Attention error",
                         elem_id="wb-c-heatmaps", render=False),
        files=gr.File(label="Downloads (JSON, CSV)", file_count="multiple", interactive=False, elem_id="wb-c-files",
                      render=False))
    reading = gr.Radio(READINGS, value="after_o", label="Attention error reading", elem_id="wb-c-reading")
    view.heatmaps.render()
    view.files.render()

    def on_run(sess, value, mixed_method, *values):
        yield from stream_compare(sess, models, form, view, value, values, ray_address, mixed_method)

    run.click(on_run, [session, reading, mixed, *form.inputs()], view.outputs(), show_progress="hidden",
              concurrency_limit=None)
    connect_cancel(cancel, session, view.status)
    reading.change(lambda sess, value: heatmaps_figure(sess.last_compare, value), [session, reading],
                   view.heatmaps, show_progress="hidden")
    build_report_button(session, "c", lambda sess: list(sess.last_compare), report_stem)
    if not ray_address:     # runs on Ray leave their codes behind: nothing to try
        build_compare_try_panel(session, models)
    return view


def report_stem(outcomes: list) -> str:
    first = outcomes[0].config
    return f"compare-w{first.bits}g{first.group_size}-report"


def row_label(outcome) -> str:
    """What the figures and the table call a run: its method, and ``mixed 3.48 bits`` for the plan's row
    (the method's own name keeps the method's color)."""
    if not outcome.report.plan:
        return outcome.method
    return f"{method_label(outcome.method)} {outcome.report.width}"


def heatmaps_figure(outcomes: list, value: str = "after_o"):
    if not outcomes:
        return empty_figure(HEATMAPS, "filled in as each method finishes")
    return attention_heatmaps({row_label(o): o.reconstruction.heads for o in outcomes}, value, title=HEATMAPS)


def curves_figure(outcomes: list, live: list[dict], total: int | None):
    frames = [o.layers[["method", "name", "block", "kind", "rel_error"]].assign(method=row_label(o))
              for o in outcomes]
    if live:
        frames.append(pd.DataFrame(live))
    if not frames:
        return empty_figure(CURVES, "waiting for the first layer")
    return layer_error_figure(pd.concat(frames, ignore_index=True), title=CURVES, total_layers=total)


def summary_rows(outcomes: dict, status: dict, configs: dict) -> pd.DataFrame:
    """One row per run of the comparison (``configs``: row key -> config), finished or waiting."""
    rows = []
    for key, cfg in configs.items():
        if key in outcomes:
            row = {**outcomes[key].summary(), "method": row_label(outcomes[key])}
        else:
            row = {"method": cfg.method if key != MIXED else f"{method_label(cfg.method)} mixed"}
        row["status"] = status.get(key, "waiting")
        rows.append(row)
    return summary_display(rows)


def mixed_config(sess, form: Form, values, method: str):
    """The Plan panel's plan as a config of ``method`` on the form's settings."""
    draft = sess.plan_draft
    if draft is None:
        raise WorkbenchError("there is no plan to add as the mixed row: make one in the Quantize tab's Mixed "
                             "precision panel (Make plan), or choose no mixed row")
    return draft.run_config(form.config(values, method), sess.files_dir(), FACE)


def local_work(configs: dict, cached: dict, models: workspace.ModelCache):
    """The runs one after another in this process, sharing its model cache."""
    def work(post, cancel):
        for key, cfg in configs.items():
            if cached[key] is not None:
                post("outcome", (key, cached[key]))
                continue
            post("method", key)
            post("outcome", (key, workspace.run(cfg, models=models, cancel=cancel,
                                                on_event=lambda ev, key=key: post("event", (key, ev)))))
    return work


def ray_work(configs: dict, cached: dict, address: str, cpus_per_run: float = 1):
    """The runs not in the cache at once, one Ray task each (a sweep of four or five points); their
    progress events come back through a Ray queue. Cancel cancels the tasks."""
    def work(post, cancel):
        from ray.util.queue import Empty, Queue

        from ..sweep import run_outcome, start_ray, task_error
        for key in configs:
            if cached[key] is not None:
                post("outcome", (key, cached[key]))
        todo = [key for key in configs if cached[key] is None]
        if not todo:
            return
        ray = start_ray(address)
        events = Queue()
        task = ray.remote(run_outcome).options(num_cpus=cpus_per_run, max_retries=0)
        pending = {task.remote(configs[m], events, m): m for m in todo}
        for m in todo:
            post("method", m)

        def drain():
            while True:
                try:
                    post("event", events.get_nowait())
                except Empty:
                    return
        try:
            while pending:
                if cancel.is_set():
                    raise Cancelled("compare cancelled")
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
                drain()
                for ref in ready:
                    m = pending.pop(ref)
                    try:
                        post("outcome", (m, ray.get(ref)))
                    except Exception as exc:     # the run's own error, carried back by Ray
                        raise WorkbenchError(f"{m}: {task_error(exc)}") from None
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            ray.kill(events.actor)
    return work


def stream_compare(sess, models: workspace.ModelCache, form: Form, view: CompareView, reading: str, values,
                   ray_address: str | None = None, mixed_method: str = NO_MIXED):
    """``mixed_method``: the method the plan's mixed row runs with (``NO_MIXED``: no such row)."""
    try:   # every run's config checked before any work
        configs = {m: form.config(values, m) for m in COMPARE_METHODS}
        if mixed_method:
            configs[MIXED] = mixed_config(sess, form, values, mixed_method)
    except WorkbenchError as exc:
        yield {view.status: message_html(f"Invalid settings: {exc}", "error")}
        return
    cached = {key: sess.cached(cfg) for key, cfg in configs.items()}
    first = configs[COMPARE_METHODS[0]]
    work = ray_work(configs, cached, ray_address) if ray_address else local_work(configs, cached, models)
    try:
        job = sess.start(work, "compare")
    except WorkbenchError as exc:
        yield {view.status: message_html(str(exc), "warn")}
        return
    outcomes, by_key, live, status = [], {}, [], {}
    done = {}                  # layers finished per run (all of them once its outcome is in)
    per_run, label, last_plot, plotted = 0, "starting", 0.0, 0
    sess.last_compare = outcomes
    yield {view.status: message_html("comparing " + ", ".join(configs) + "...", "info"),
           view.progress: progress_html(0, 1, label, 0), view.table: summary_rows(by_key, status, configs),
           view.curves: empty_figure(CURVES, "waiting for the first layer"), view.heatmaps: heatmaps_figure([]),
           view.files: None}

    def overall():
        return sum(done.values()), per_run * len(configs)

    for msg in job.messages():
        elapsed = time.perf_counter() - job.started
        update = {}
        if msg is None:
            if len(live) > plotted:
                update[view.curves], plotted = curves_figure(outcomes, live, per_run or None), len(live)
        elif msg.kind == "method":
            status[msg.payload] = "running"
            update[view.table] = summary_rows(by_key, status, configs)
        elif msg.kind == "event":
            m, ev = msg.payload
            if ev.kind == "progress":     # perplexity windows, held-out blocks: counted in the label
                label = progress_label(ev)
            else:
                per_run = ev.total or per_run
            if ev.kind == "phase":
                label = ev.message
            elif ev.kind == "layer_finished":
                done[m] = ev.index
                live.append({"method": m, "name": ev.layer, "block": ev.block, "kind": ev.layer_kind,
                             "rel_error": ev.rel_error})
                label = f"{m}: {ev.index}/{per_run} layers"
                if time.perf_counter() - last_plot > PLOT_EVERY:
                    update[view.curves], plotted = curves_figure(outcomes, live, per_run), len(live)
                    last_plot = time.perf_counter()
        elif msg.kind == "outcome":
            key, o = msg.payload
            was_cached = cached[key] is not None
            sess.remember(o)
            outcomes.append(o)
            by_key[key] = o
            per_run = per_run or len(o.layers)
            status[key] = "cached" if was_cached else "done"
            live = [p for p in live if p["method"] != key]
            plotted, done[key] = 0, per_run
            label = f"{key} {'from cache' if was_cached else 'finished'}"
            update.update({view.table: summary_rows(by_key, status, configs),
                           view.heatmaps: heatmaps_figure(outcomes, reading),
                           view.curves: curves_figure(outcomes, live, per_run)})
        elif msg.kind == "result":
            files = write_run_files(sess.files_dir(), f"compare-w{first.bits}g{first.group_size}", outcomes)
            n, total = overall()
            fresh = sum(1 for key in configs if cached[key] is None)
            note = (f"all {len(configs)} runs shown from this page's cache" if fresh == 0
                    else f"compared {len(outcomes)} runs in {elapsed:.0f} s")
            yield {view.status: message_html(note, "ok"), view.files: files,
                   view.progress: progress_html(total, total, "done", elapsed, state="done"),
                   view.table: summary_rows(by_key, status, configs),
                   view.curves: curves_figure(outcomes, [], per_run)}
            return
        elif msg.kind in ("cancelled", "error"):
            n, total = overall()
            kind = "warn" if msg.kind == "cancelled" else "error"
            note = "cancelled" if msg.kind == "cancelled" else error_text(msg.payload)
            yield {view.status: message_html(f"{note}; finished methods are kept", kind),
                   view.progress: progress_html(n, total, msg.kind, elapsed,
                                                state="cancelled" if kind == "warn" else "error"),
                   view.table: summary_rows(by_key, {**status, **{m: msg.kind for m, s in status.items()
                                                                  if s == "running"}}, configs)}
            return
        n, total = overall()
        update[view.progress] = progress_html(n, total, label, elapsed)
        yield update
