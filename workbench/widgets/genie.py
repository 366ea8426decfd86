"""Genie gallery: synthesize calibration images for a BatchNorm CNN, watch them form, quantize it.

The same live views as the app's Genie tab: the BN-statistics loss while distilling, a gallery
of the first images with the full-precision model's predicted class and probability under each
(redrawn as distillation proceeds), Genie-M block by block, and the accuracy table.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import threading

import ipywidgets as W
import torch

from ..errors import WorkbenchError
from ..figures import empty_figure
from ..figures.genie import accuracy_table_figure, blocks_figure, bn_loss_figure, prediction_captions
from ..genie.evaluate import accuracy
from ..genie.pipeline import SOURCE_LABELS, SOURCES, GenieRunConfig, Loaded, calibration_images, load_for_run, plan
from ..genie.png import encode_png, image_tiles
from ..genie.progress import GenieTrace, Watch
from ..genie.qlayers import find_units
from ..genie.quantize import quantize_model
from .common import LiveFigure, RunWidget, Throttle, error_line, genie_settings, shown_figure

_MODELS: dict = {}
_MODELS_LOCK = threading.Lock()

METHOD_LABELS = {"genie": "Genie-M", "rtn": "RTN"}
LOSS_TITLE = "BN-statistics loss while distilling"
BLOCKS_TITLE = "Genie-M, block by block"


def digits(cfg: GenieRunConfig | None = None) -> tuple[Loaded, float]:
    """The run's CNN (full precision, eval mode, on the CPU), its digits split and its test accuracy,
    loaded once per weights file and architecture."""
    cfg = dataclasses.replace(cfg or GenieRunConfig(), device="cpu")
    key = (cfg.model, cfg.architecture)
    with _MODELS_LOCK:
        if key not in _MODELS:
            loaded = load_for_run(cfg)
            _MODELS[key] = (loaded, accuracy(loaded.model, loaded.split.x_test, loaded.split.y_test))
        return _MODELS[key]


def gallery_html(images, captions: list[str], columns: int = 8, upscale: int = 4) -> str:
    """Images [N, C, H, W] as a grid of PNGs (each stretched to its own range) with a caption under each."""
    if images is None or len(images) == 0:
        return '<div class="wb-gallery" style="color:#888">no images yet</div>'
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    cells = []
    for tile, caption in zip(image_tiles(images, upscale=upscale), captions):
        uri = "data:image/png;base64," + base64.b64encode(encode_png(tile)).decode("ascii")
        cells.append(f'<figure style="margin:0;text-align:center"><img src="{uri}" width="{tile.shape[1]}" '
                     f'height="{tile.shape[0]}" style="image-rendering:pixelated" alt="{html.escape(caption)}">'
                     f'<figcaption style="font-size:0.8em">{html.escape(caption)}</figcaption></figure>')
    return (f'<div class="wb-gallery" style="display:grid;grid-template-columns:repeat({columns}, max-content);'
            f'gap:6px 10px">' + "".join(cells) + "</div>")


class GenieGallery(RunWidget):
    """``synthesize()`` distills calibration images (``images``; the first ``show`` of them in the
    gallery, live, captioned with the full-precision prediction, and the loss in ``loss_figure``);
    ``quantize()`` quantizes the CNN on them (``blocks_figure`` fills in block by block) and adds a
    row to ``rows`` (shown in ``figure``, the accuracy table); ``run()`` does both. All take ``wait=True``.
    """

    run_label = "Quantize"

    def __init__(self, show: int = 32, use_figure_widget: bool | None = None, refresh: float = 0.5, **settings):
        s = {**genie_settings(), **settings}
        fields = {f.name for f in dataclasses.fields(GenieRunConfig)}
        unknown = set(s) - fields - {"source"}
        if unknown:
            raise WorkbenchError(f"the gallery has no setting {', '.join(sorted(unknown))}; choose from "
                                 f"{', '.join(sorted(fields | {'source'}))}")
        base = GenieRunConfig(**{k: v for k, v in s.items() if k in fields})
        self.base = base.with_source(s["source"]) if "source" in s else base
        style = {"description_width": "110px"}
        self.data = W.Dropdown(options=[(SOURCE_LABELS[d], d) for d in SOURCES], value=self.base.source,
                               description="data", style=style)
        self.samples = W.BoundedIntText(value=base.samples, min=1, max=4096, description="images", style=style,
                                        layout=W.Layout(width="200px"))
        self.steps = W.BoundedIntText(value=base.distill_steps, min=0, max=10000, description="distill steps",
                                      style=style, layout=W.Layout(width="200px"))
        self.weight_bits = W.IntSlider(value=base.weight_bits, min=2, max=8, description="weight bits", style=style)
        self.act_bits = W.Dropdown(options=[("float", 0)] + [(str(b), b) for b in range(2, 9)], value=base.act_bits,
                                   description="activation bits", style=style)
        self.method = W.Dropdown(options=[(v, k) for k, v in METHOD_LABELS.items()], value=base.method,
                                 description="quantizer", style=style)
        self.iters = W.BoundedIntText(value=base.iters, min=1, max=100000, description="steps per block",
                                      style=style, layout=W.Layout(width="200px"))
        self.show_count = show
        self.images_steps = base.distill_steps      # steps per batch of the images shown (batch lines in the loss)
        self.throttle = Throttle(refresh)
        self._setup_runner()
        self.synth_button = W.Button(description="Synthesize", button_style="info", icon="image")
        self.gallery = W.HTML(gallery_html(None, []))
        self.loss = LiveFigure(empty_figure(LOSS_TITLE, "press Synthesize", height=300), use_figure_widget)
        self.blocks = LiveFigure(empty_figure(BLOCKS_TITLE, "press Quantize", height=300), use_figure_widget)
        self.table = LiveFigure(empty_figure("Top-1 accuracy (%)", "press Quantize", height=300), use_figure_widget)
        self.trace = GenieTrace(show)
        self.images: torch.Tensor | None = None
        self.images_source: str | None = None
        self.images_config: GenieRunConfig | None = None
        self.rows: list[dict] = []
        self.last_units: list = []
        self.synth_button.on_click(lambda _: self._click(self.synthesize))
        super().__init__([W.HBox([self.data, self.samples, self.steps]),
                          W.HBox([self.weight_bits, self.act_bits, self.method, self.iters]),
                          W.HBox([self.synth_button, self.buttons()]),
                          self.runner.status, self.gallery, W.HBox([self.loss.widget, self.blocks.widget]),
                          self.table.widget])

    figure = shown_figure("table")
    loss_figure = shown_figure("loss")
    blocks_figure = shown_figure("blocks")

    @property
    def captions(self) -> list[str]:
        """The captions under the gallery's images now (the full-precision model's class and probability)."""
        _, classes, confidence = self.trace.shown()
        return prediction_captions(classes, confidence)

    def config(self) -> GenieRunConfig:
        return dataclasses.replace(self.base, samples=self.samples.value, distill_steps=self.steps.value,
                                   weight_bits=self.weight_bits.value, act_bits=self.act_bits.value,
                                   method=self.method.value, iters=self.iters.value).with_source(self.data.value)

    def set(self, **values):
        names = {"data": self.data, "source": self.data, "samples": self.samples, "distill_steps": self.steps,
                 "weight_bits": self.weight_bits, "act_bits": self.act_bits, "method": self.method,
                 "iters": self.iters}
        for k, v in values.items():
            if k not in names:
                raise WorkbenchError(f"the gallery has no setting {k!r}; choose from {', '.join(names)}")
            names[k].value = v

    def _click(self, action):
        try:
            action(wait=False)
        except Exception as exc:
            self.runner.say(error_line(exc), "error")

    # -- live views ---------------------------------------------------------------------------
    def _draw(self, force: bool = False):
        if not force and not self.throttle():
            return
        done, total = self.trace.progress()
        self.runner.set_progress(done, total)
        self.runner.say(self.trace.label())
        images, classes, confidence = self.trace.shown()
        self.gallery.value = gallery_html(images, prediction_captions(classes, confidence))
        if self.trace.steps:
            self.loss.show(bn_loss_figure(self.trace.steps, self.trace.losses, self.trace.distill_total,
                                          self.images_steps, height=300))
        if self.trace.names:
            self.blocks.show(blocks_figure(self.trace.units, self.trace.names, height=300))

    def _watch(self, cancel) -> Watch:
        def on_event(ev):
            kind = self.trace.add(ev)
            self._draw(force=kind == "unit_finished" or (kind == "images" and ev.final))
        return Watch(on_event, cancel, gallery=self.show_count)

    # -- the two steps ---------------------------------------------------------------------
    def _distill(self, cfg: GenieRunConfig, cancel):
        loaded, _ = digits(cfg)
        torch.manual_seed(cfg.seed)
        self.trace = GenieTrace(self.show_count)
        self.images_steps = cfg.distill_steps
        watch = self._watch(cancel)
        plan(watch, cfg, loaded)
        watch.phase(f"calibration images from {SOURCE_LABELS[cfg.source]}")
        images = calibration_images(loaded.model, cfg, loaded.split, loaded.device, watch=watch)
        self._draw(force=True)
        return images

    def _quantize(self, cfg: GenieRunConfig, images, cancel) -> dict:
        loaded, fp_acc = digits(cfg)
        watch = self._watch(cancel)
        names = find_units(loaded.model)
        self.trace.names, self.trace.iters, self.trace.units = names, cfg.iters if cfg.method == "genie" else 0, []
        self.trace.steps, self.trace.losses, self.trace.distill_total = [], [], 0     # the progress is Genie-M's now
        on_step, on_unit = watch.unit_callbacks(names, self.trace.iters)
        watch.phase(METHOD_LABELS[cfg.method])
        result = quantize_model(loaded.model, images, cfg.quant_config(), callback=on_step, on_unit=on_unit,
                                cancel=cancel)
        self.last_units = result.units
        q_acc = accuracy(result.model, loaded.split.x_test, loaded.split.y_test)
        self._draw(force=True)
        return {"setting": cfg.setting if cfg.act_bits else f"W{cfg.weight_bits}Afp", "data": cfg.source,
                "images": int(len(images)), "quantizer": METHOD_LABELS[cfg.method], "full precision": fp_acc,
                "quantized": q_acc, "seconds": round(result.seconds, 1)}

    def _keep_images(self, images, cfg: GenieRunConfig):
        self.images, self.images_source, self.images_config = images, cfg.source, cfg

    def _add_row(self, row: dict):
        self.rows.append(row)
        self.table.show(accuracy_table_figure(self.rows))

    def _same_images(self, cfg: GenieRunConfig) -> bool:
        old = self.images_config
        return old is not None and self.images is not None and all(
            getattr(old, f) == getattr(cfg, f) for f in ("data", "swing", "samples", "distill_steps", "distill_batch",
                                                          "seed", "model", "architecture"))

    def synthesize(self, wait: bool = True, **settings):
        """Calibration images from the chosen source; returns them when ``wait``."""
        self.runner.check_idle()
        self.set(**settings)
        cfg = self.config()
        self.runner.start(lambda cancel: (self._distill(cfg, cancel), cfg),
                          lambda value: self._keep_images(*value), "loading the model")
        return self._finish(wait, lambda: self.images)

    def quantize(self, wait: bool = True, **settings):
        """Quantize on the current images (synthesized first if there are none or their settings changed)."""
        self.runner.check_idle()
        self.set(**settings)
        cfg = self.config()
        reuse = self._same_images(cfg)

        def work(cancel):
            images = self.images if reuse else self._distill(cfg, cancel)
            if not reuse:
                self._keep_images(images, cfg)
            return self._quantize(cfg, images, cancel)

        self.runner.start(work, self._add_row, "quantizing")
        return self._finish(wait, lambda: self.rows[-1] if self.rows and self.runner.state == "done" else None)

    def run(self, wait: bool = True, **settings):
        """Synthesize (if needed) and quantize; the new accuracy row when ``wait``."""
        return self.quantize(wait=wait, **settings)
