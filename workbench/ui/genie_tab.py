"""The Genie tab: zero-shot quantization of a BatchNorm CNN, with distillation and Genie-M shown live.

Its form is its own (a CNN, not the language model the other tabs share). Run distills the
calibration images (or takes noise / real digits), quantizes block by block and fills the
accuracy table against full precision and round to nearest; "Run every data source" does the
same setting once per source, side by side, as ``benchmarks/genie.py`` does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ..errors import WorkbenchError
from ..figures import empty_figure
from ..figures.genie import blocks_figure, bn_loss_figure, prediction_captions
from ..genie.distill import check_cancel
from ..genie.evaluate import accuracy
from ..genie.model import ARCHITECTURES, DEFAULT_ARCHITECTURE, DEFAULT_WEIGHTS
from ..genie.pipeline import SOURCE_LABELS, SOURCES, GenieRunConfig, load_for_run, rtn_baseline, run_genie
from ..genie.png import image_tiles
from ..genie.progress import GenieEvent, GenieTrace
from ..jsonsafe import dumps
from ..report import write_atomic
from ..workspace import SLOTS
from .exposure import EXPOSURE
from .views import TabView, connect_cancel, error_text, message_html, progress_html

EXPLAIN = """**Quantization without data.** A CNN trained with BatchNorm remembers, in every BN layer, the mean
and variance its inputs had on the training data. **Genie-D** trains a small generator and its latent
inputs until the batch statistics of the images it makes match those BN statistics layer by layer (the
**BN-statistics loss**, log scale). The images need not look like digits; the captions say what the
full-precision model sees in them (class and probability). **Genie-M** then quantizes the network block
by block on them, learning each weight's rounding direction and the step sizes, and fitting each quantized
block to the full-precision block's output: the block plot shows that error with round-to-nearest weights
(where it starts) and after. The first convolution and the last linear layer stay at 8 bits. Accuracy is
measured on the digits test split; the RTN row takes its activation ranges from real digits, its most
favourable case. *Pixels* optimizes the images directly on the same loss, *noise* is the floor, *real* is
few-shot calibration on training digits; *swing* shifts the sampling grid of strided convolutions.
This tab has its own settings: the model and data rows above the tabs are the language model's."""

MODEL_KINDS = [("digits CNN (shipped)", "shipped"), ("a .safetensors file", "file")]
ACT_BITS = [("float", 0)] + [(str(b), b) for b in range(2, 9)]
SHOWN = 32                  # images in the gallery: the first ones of the calibration set
REFRESH = {"progress": 0.3, "loss": 0.6, "gallery": 1.0}    # seconds between redraws while a run streams
# what the tab opens with: Genie-D, W4A4, sized to finish in a few minutes on a 2-core CPU
START = dict(samples=128, weight_bits=4, act_bits=4, source="genie", distill_steps=150, distill_batch=128,
             iters=250, seed=0)
LOSS_TITLE = "BN-statistics loss while distilling"
BLOCKS_TITLE = "Genie-M, block by block"
CANCELLED = "cancelled; finished results are kept"
TABLE_COLUMNS = ["model", "calibration", "top-1 accuracy %", "change vs full precision", "seconds"]


@dataclass
class GenieView(TabView):
    loss: gr.Plot
    blocks: gr.Plot
    gallery: gr.Gallery
    table: gr.Dataframe
    sources: gr.Dataframe
    files: gr.File


# -- the form ---------------------------------------------------------------------------------

def _whole(value, label: str, low: int, high: int) -> int:
    """A whole number from a form box (Gradio sends floats or None), or an error naming the field."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise WorkbenchError(f"{label} must be a whole number from {low} to {high}, got {value!r}")
    return value


def genie_config(kind: str, path: str, architecture: str, samples, weight_bits, act_bits, source: str,
                 distill_steps, distill_batch, iters, seed) -> GenieRunConfig:
    """The form's values as a run's config; ``WorkbenchError`` names the field at fault."""
    if kind == "file":
        path = (path or "").strip()
        if not path:
            raise WorkbenchError("Model weights: give the path of a .safetensors file, or choose the shipped "
                                 "digits CNN")
        EXPOSURE.check_path(path, "Model weights", "the shipped digits CNN", "the shipped digits CNN works everywhere")
        model = path
        if architecture not in ARCHITECTURES:
            raise WorkbenchError(f"Architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    elif kind == "shipped":
        model, architecture = str(DEFAULT_WEIGHTS), DEFAULT_ARCHITECTURE
    else:
        raise WorkbenchError(f"Model must be the shipped digits CNN or a .safetensors file, got {kind!r}")
    if source not in SOURCES:
        raise WorkbenchError(f"Data source must be one of {', '.join(SOURCE_LABELS[s] for s in SOURCES)}, "
                             f"got {source!r}")
    act_bits = _whole(act_bits, "Activation bits", 0, 8)
    if act_bits == 1:
        raise WorkbenchError("Activation bits must be float (0) or a whole number from 2 to 8, got 1")
    base = GenieRunConfig(
        model=model, architecture=architecture, samples=_whole(samples, "Samples", 1, 4096),
        weight_bits=_whole(weight_bits, "Weight bits", 2, 8), act_bits=act_bits,
        distill_steps=_whole(distill_steps, "Distillation steps", 0, 10000),
        distill_batch=_whole(distill_batch, "Distillation batch size", 1, 4096),
        iters=_whole(iters, "Genie-M steps per block", 1, 100000), seed=_whole(seed, "Seed", 0, 2 ** 32 - 1),
        device="auto")
    return base.with_source(source)


@dataclass
class GenieForm:
    kind: gr.Radio
    path: gr.Textbox
    architecture: gr.Dropdown
    samples: gr.Number
    weight_bits: gr.Slider
    act_bits: gr.Dropdown
    source: gr.Radio
    distill_steps: gr.Number
    distill_batch: gr.Number
    iters: gr.Number
    seed: gr.Number

    def inputs(self) -> list:
        return [self.kind, self.path, self.architecture, self.samples, self.weight_bits, self.act_bits, self.source,
                self.distill_steps, self.distill_batch, self.iters, self.seed]


def build_genie_form(start: dict) -> GenieForm:
    with gr.Row(equal_height=True):
        kind = gr.Radio(MODEL_KINDS, value="shipped", label="Model", elem_id="wb-g-kind", scale=2)
        path = gr.Textbox(label="Model weights", placeholder="/path/to/cnn.safetensors", elem_id="wb-g-path",
                          info="a CNN with BatchNorm layers; the JSON beside it, if any, gives its settings",
                          visible=False, scale=3)
        architecture = gr.Dropdown(list(ARCHITECTURES), value=DEFAULT_ARCHITECTURE, label="Architecture",
                                   elem_id="wb-g-arch", visible=False, scale=1)
    with gr.Row(equal_height=True):
        source = gr.Radio([(SOURCE_LABELS[s], s) for s in ("genie", "genie-swing", "pixels", "noise", "real")],
                          value=start["source"], label="Data source", elem_id="wb-g-source", scale=3)
        samples = gr.Number(start["samples"], precision=0, label="Samples", info="calibration images",
                            elem_id="wb-g-samples", scale=1)
        weight_bits = gr.Slider(2, 8, value=start["weight_bits"], step=1, label="Weight bits", elem_id="wb-g-wbits",
                                scale=1)
        act_bits = gr.Dropdown(ACT_BITS, value=start["act_bits"], label="Activation bits", elem_id="wb-g-abits",
                               scale=1)
    with gr.Accordion("More Genie settings", open=False, elem_id="wb-g-more"):
        with gr.Row(equal_height=True):
            distill_steps = gr.Number(start["distill_steps"], precision=0, label="Distillation steps",
                                      info="Adam steps per batch of images", elem_id="wb-g-steps")
            distill_batch = gr.Number(start["distill_batch"], precision=0, label="Distillation batch size",
                                      info="images whose statistics are matched together", elem_id="wb-g-batch")
            iters = gr.Number(start["iters"], precision=0, label="Genie-M steps per block", elem_id="wb-g-iters")
            seed = gr.Number(start["seed"], precision=0, label="Seed", elem_id="wb-g-seed")
    kind.change(lambda k: [gr.update(visible=k == "file")] * 2, kind, [path, architecture], show_progress="hidden")
    return GenieForm(kind, path, architecture, samples, weight_bits, act_bits, source, distill_steps, distill_batch,
                     iters, seed)


# -- what the page shows ------------------------------------------------------------------------

def gallery_items(trace: GenieTrace) -> list[tuple]:
    """(picture, caption) per shown image: 16x16 images upscaled 4x, the full-precision prediction below."""
    images, classes, confidence = trace.shown()
    if images is None:
        return []
    return list(zip(image_tiles(images, upscale=4), prediction_captions(classes, confidence)))


def _pct(v) -> str:
    return "" if v is None else f"{v:.2f}"


def accuracy_table(cfg: GenieRunConfig, baseline: dict | None, report: dict | None, state: str = "waiting",
                   seconds: float | None = None) -> pd.DataFrame:
    """Full precision, round to nearest and this run, on the digits test split."""
    fp = None if baseline is None else baseline["fp"]
    rtn = None if baseline is None else baseline["rtn"]

    def change(acc):
        return "" if acc is None or fp is None else f"{acc - fp:+.2f}"

    rtn_data = f"{cfg.samples} real digits (activation ranges)" if cfg.act_bits else "none needed"
    run_acc = None if report is None else report["quant_accuracy"]
    run_seconds = seconds if report is None else report["distill_seconds"] + report["quant_seconds"]
    rows = [
        ["full precision", "", _pct(fp) or state, "", ""],
        [f"RTN {cfg.setting}", rtn_data, _pct(rtn and rtn["accuracy"]) or state, change(rtn and rtn["accuracy"]),
         "" if rtn is None else f"{rtn['seconds']:.1f}"],
        [f"Genie-M {cfg.setting} (this run)", f"{cfg.samples} images, {SOURCE_LABELS[cfg.source]}",
         _pct(run_acc) or state, change(run_acc), "" if run_seconds is None else f"{run_seconds:.1f}"],
    ]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def sources_table(cfg: GenieRunConfig, baseline: dict | None, reports: dict, states: dict) -> pd.DataFrame:
    """The benchmark's table for one setting: accuracy and seconds of RTN and of Genie-M on every source."""
    columns = ["", "full precision", "RTN"] + [f"Genie-M + {SOURCE_LABELS[s]}" for s in SOURCES]
    fp = "" if baseline is None else _pct(baseline["fp"])
    rtn = baseline and baseline["rtn"]
    acc = [f"{cfg.setting} top-1 %", fp or "waiting", _pct(rtn and rtn["accuracy"]) or "waiting"]
    sec = [f"{cfg.setting} seconds", "", "" if not rtn else f"{rtn['seconds']:.1f}"]
    for s in SOURCES:
        r = reports.get(s)
        acc.append(_pct(r["quant_accuracy"]) if r else states.get(s, "waiting"))
        sec.append(f"{r['distill_seconds'] + r['quant_seconds']:.1f}" if r else "")
    return pd.DataFrame([acc, sec], columns=columns)


def empty_sources() -> pd.DataFrame:
    return pd.DataFrame(columns=["", "full precision", "RTN"] + [f"Genie-M + {SOURCE_LABELS[s]}" for s in SOURCES])


def write_reports(directory, cfg: GenieRunConfig, baseline: dict, reports: dict) -> list[str]:
    """The runs' reports (those of ``workbench genie --report``) with the baselines, as one JSON file."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"genie-{cfg.setting}-" + ("every-source" if len(reports) > 1 else next(iter(reports), "none"))
    body = {"fp_accuracy": baseline["fp"], "rtn": baseline["rtn"], "runs": reports}
    return [str(write_atomic(directory / f"{stem}.json", dumps(body, indent=1)))]


# -- the tab ------------------------------------------------------------------------------------

def build_genie_tab(session: gr.State, start: dict | None = None) -> GenieView:
    start = {**START, **(start or {})}
    gr.Markdown(EXPLAIN)
    form = build_genie_form(start)
    with gr.Row():
        run = gr.Button("Run", variant="primary", elem_id="wb-g-run", scale=2)
        every = gr.Button("Run every data source", elem_id="wb-g-every", scale=2)
        cancel = gr.Button("Cancel", variant="stop", elem_id="wb-g-cancel", scale=1)
    view = GenieView(
        status=gr.HTML(elem_id="wb-g-status"),
        progress=gr.HTML(elem_id="wb-g-progress"),
        loss=gr.Plot(empty_figure(LOSS_TITLE, "press Run", height=320), label="Distillation", elem_id="wb-g-loss",
                     render=False),
        blocks=gr.Plot(empty_figure(BLOCKS_TITLE, "filled in block by block", height=320), label="Genie-M",
                       elem_id="wb-g-blocks", render=False),
        gallery=gr.Gallery(label=f"Calibration images (the first {SHOWN}) with the full-precision model's "
                                 "prediction", columns=8, height="fit-content", object_fit="contain", format="png",
                           allow_preview=True, elem_id="wb-g-gallery", interactive=False, render=False),
        table=gr.Dataframe(label="Top-1 accuracy on the digits test split", elem_id="wb-g-table", interactive=False,
                           render=False),
        sources=gr.Dataframe(empty_sources(), label="Every data source, same setting (Run every data source)",
                             elem_id="wb-g-sources", interactive=False, render=False),
        files=gr.File(label="Report download (JSON)", file_count="multiple", elem_id="wb-g-files",
                      interactive=False, render=False))
    with gr.Row():
        view.loss.render()
        view.blocks.render()
    view.gallery.render()
    view.table.render()
    view.sources.render()
    view.files.render()

    def on_run(sess, *values):
        yield from stream_genie(sess, view, values, every=False)

    def on_every(sess, *values):
        yield from stream_genie(sess, view, values, every=True)

    run.click(on_run, [session, *form.inputs()], view.outputs(), show_progress="hidden", concurrency_limit=None)
    every.click(on_every, [session, *form.inputs()], view.outputs(), show_progress="hidden", concurrency_limit=None)
    connect_cancel(cancel, session, view.status)
    return view


def genie_work(cfg: GenieRunConfig, sources: tuple):
    """The run off the page's thread: baselines once, then one Genie run per source, all streamed."""
    def work(post, cancel):
        with SLOTS.held(cancel, lambda ev: post("phase", ev.message), "genie"):
            post("phase", "loading the model")
            loaded = load_for_run(cfg)
            check_cancel(cancel)
            post("phase", "full precision and round-to-nearest accuracy")
            fp = accuracy(loaded.model, loaded.split.x_test, loaded.split.y_test, device=loaded.device)
            post("baseline", {"fp": fp, "rtn": rtn_baseline(cfg, loaded, cancel)})
            reports = {}
            for source in sources:
                post("source", source)
                run = run_genie(cfg.with_source(source), on_event=lambda ev: post("event", ev), cancel=cancel,
                                gallery=SHOWN, loaded=loaded)
                reports[source] = run.report
                post("report", (source, run.report))
            return reports
    return work


def stream_genie(sess, view: GenieView, values, every: bool):
    """The Run handlers: validate, start the worker, turn its messages into page updates (throttled)."""
    try:
        cfg = genie_config(*values)
    except WorkbenchError as exc:
        yield {view.status: message_html(f"Invalid settings: {exc}", "error")}
        return
    sources = SOURCES if every else (cfg.source,)
    try:
        job = sess.start(genie_work(cfg, sources), "genie")
    except WorkbenchError as exc:
        yield {view.status: message_html(str(exc), "warn")}
        return
    trace, baseline, reports, states = GenieTrace(SHOWN), None, {}, {}
    current, index = cfg.source, 0
    dirty = {"loss", "gallery", "blocks"}
    last = dict.fromkeys(REFRESH, 0.0)
    what = "every data source" if every else SOURCE_LABELS[cfg.source]
    yield {view.status: message_html(f"Genie {cfg.setting} on {what}...", "info"),
           view.progress: progress_html(0, 1, "starting", 0), view.loss: empty_figure(LOSS_TITLE, "starting", 320),
           view.blocks: empty_figure(BLOCKS_TITLE, "filled in block by block", 320), view.gallery: [],
           view.table: accuracy_table(cfg, None, None), view.files: None,
           **({view.sources: sources_table(cfg, None, {}, {})} if every else {})}

    def overall():
        done, total = trace.progress()
        if not every:
            return done, total
        share = 0 if total == 0 else done / total
        return round(1000 * (index + share)), 1000 * len(sources)

    def label():
        text = trace.label()
        return f"{SOURCE_LABELS[current]} ({index + 1}/{len(sources)}): {text}" if every else text

    def redraw(force: bool = False) -> dict:
        now, update = time.perf_counter(), {}
        if "loss" in dirty and (force or now - last["loss"] > REFRESH["loss"]):
            update[view.loss] = bn_loss_figure(trace.steps, trace.losses, trace.distill_total, cfg.distill_steps,
                                               title=f"{LOSS_TITLE}: {SOURCE_LABELS[current]}")
            dirty.discard("loss")
            last["loss"] = now
        if "gallery" in dirty and (force or now - last["gallery"] > REFRESH["gallery"]):
            update[view.gallery] = gallery_items(trace)
            dirty.discard("gallery")
            last["gallery"] = now
        if "blocks" in dirty:
            update[view.blocks] = blocks_figure(trace.units, trace.names, title=f"{BLOCKS_TITLE}: "
                                                f"{SOURCE_LABELS[current]}")
            dirty.discard("blocks")
        return update

    for msg in job.messages(idle=0.3):
        elapsed = time.perf_counter() - job.started
        update, force = {}, False
        if msg is None:
            force = True
        elif msg.kind == "phase":
            trace.add(GenieEvent("phase", message=msg.payload))
        elif msg.kind == "baseline":
            baseline = msg.payload
            update[view.table] = accuracy_table(cfg, baseline, None, "running")
            if every:
                update[view.sources] = sources_table(cfg, baseline, reports, states)
        elif msg.kind == "source":
            current, index = msg.payload, sources.index(msg.payload)
            trace = GenieTrace(SHOWN)
            dirty.update({"loss", "gallery", "blocks"})
            states[current] = "running"
            if every:
                update[view.sources] = sources_table(cfg, baseline, reports, states)
        elif msg.kind == "event":
            kind = trace.add(msg.payload)
            if kind == "distill_step":
                dirty.add("loss")
            elif kind == "images":
                dirty.add("gallery")
                force = msg.payload.final
            elif kind in ("plan", "unit_finished"):
                dirty.add("blocks")
        elif msg.kind == "report":
            source, report = msg.payload
            reports[source] = report
            states[source] = "done"
            if source == cfg.source:
                update[view.table] = accuracy_table(cfg, baseline, report)
            if every:
                update[view.sources] = sources_table(cfg, baseline, reports, states)
            force = True
        elif msg.kind == "result":
            done = {view.status: message_html(f"Genie {cfg.setting} on {what} finished in {elapsed:.0f} s", "ok"),
                    view.progress: progress_html(1, 1, "done", elapsed, state="done"),
                    view.table: accuracy_table(cfg, baseline, reports.get(cfg.source)),
                    view.files: write_reports(sess.files_dir(), cfg, baseline, reports), **redraw(force=True)}
            if every:
                done[view.sources] = sources_table(cfg, baseline, reports, states)
            yield done
            return
        elif msg.kind in ("cancelled", "error"):
            kind = "warn" if msg.kind == "cancelled" else "error"
            note = CANCELLED if msg.kind == "cancelled" else f"{error_text(msg.payload)}; finished results are kept"
            for s in sources:
                if states.get(s) == "running":
                    states[s] = msg.kind
            n, total = overall()
            end = {view.status: message_html(note, kind),
                   view.progress: progress_html(n, total, msg.kind, elapsed, state="cancelled" if kind == "warn"
                                                else "error"),
                   view.table: accuracy_table(cfg, baseline, reports.get(cfg.source), msg.kind), **redraw(force=True)}
            if every:
                end[view.sources] = sources_table(cfg, baseline, reports, states)
            yield end
            return
        now = time.perf_counter()
        if update or force or now - last["progress"] > REFRESH["progress"]:
            n, total = overall()
            update[view.progress] = progress_html(n, total, label(), elapsed)
            last["progress"] = now
            update.update(redraw(force))
            yield update
