"""Genie gallery: synthesize calibration images for the digits CNN, look at them, quantize it."""
from __future__ import annotations

import dataclasses
import threading

import ipywidgets as W
import torch

from ..errors import WorkbenchError
from ..figures import empty_figure
from ..figures.genie import accuracy_table_figure, samples_figure
from ..genie.data import DigitsConfig, load_digits_split
from ..genie.evaluate import accuracy
from ..genie.model import load_default_model
from ..genie.qlayers import find_units
from ..genie.pipeline import DATA_SOURCES, GenieRunConfig, calibration_images
from ..genie.quantize import quantize_model
from .common import LiveFigure, RunWidget, error_line, genie_settings, shown_figure

_DIGITS: dict = {}
_DIGITS_LOCK = threading.Lock()

SOURCE_LABELS = {"genie": "Genie-D (generator + latents)", "pixels": "pixels optimized directly",
                 "noise": "Gaussian noise", "real": "real digits (few-shot)"}
METHOD_LABELS = {"genie": "Genie-M", "rtn": "RTN"}


def digits(weights: str | None = None):
    """The shipped digits CNN (full precision, eval mode), its metadata and the data split, loaded once."""
    key = weights or "default"
    with _DIGITS_LOCK:
        if key not in _DIGITS:
            model, info = load_default_model(weights) if weights else load_default_model()
            split = load_digits_split(DigitsConfig(**info["data"]))
            fp_acc = accuracy(model, split.x_test, split.y_test)
            _DIGITS[key] = (model, info, split, fp_acc)
        return _DIGITS[key]


class GenieGallery(RunWidget):
    """``synthesize()`` distills calibration images (``images``, shown in ``gallery_figure``);
    ``quantize()`` quantizes the CNN on them and adds a row to ``rows`` (shown in
    ``figure``, the accuracy table); ``run()`` does both. All take ``wait=True``.
    """

    run_label = "Quantize"

    def __init__(self, show: int = 32, use_figure_widget: bool | None = None, **settings):
        s = {**genie_settings(), **settings}
        base = GenieRunConfig(**{k: v for k, v in s.items()
                                 if k in {f.name for f in dataclasses.fields(GenieRunConfig)}})
        self.base = base
        style = {"description_width": "110px"}
        self.data = W.Dropdown(options=[(SOURCE_LABELS[d], d) for d in DATA_SOURCES], value=base.data,
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
        self.iters = W.BoundedIntText(value=base.iters, min=0, max=100000, description="steps per block",
                                      style=style, layout=W.Layout(width="200px"))
        self.show_count = show
        self._setup_runner()
        self.synth_button = W.Button(description="Synthesize", button_style="info", icon="image")
        self.gallery = LiveFigure(empty_figure("Calibration images", "press Synthesize", height=300),
                                  use_figure_widget)
        self.table = LiveFigure(empty_figure("Top-1 accuracy (%)", "press Quantize", height=300), use_figure_widget)
        self.images: torch.Tensor | None = None
        self.images_source: str | None = None
        self.rows: list[dict] = []
        self.last_units: list = []
        self.synth_button.on_click(lambda _: self._click(self.synthesize))
        super().__init__([W.HBox([self.data, self.samples, self.steps]),
                          W.HBox([self.weight_bits, self.act_bits, self.method, self.iters]),
                          W.HBox([self.synth_button, self.buttons()]),
                          self.runner.status, self.gallery.widget, self.table.widget])

    figure = shown_figure("table")
    gallery_figure = shown_figure("gallery")

    def config(self) -> GenieRunConfig:
        return dataclasses.replace(self.base, data=self.data.value, samples=self.samples.value,
                                   distill_steps=self.steps.value, distill_batch=min(self.base.distill_batch,
                                                                                     self.samples.value),
                                   weight_bits=self.weight_bits.value, act_bits=self.act_bits.value,
                                   method=self.method.value, iters=self.iters.value)

    def set(self, **values):
        names = {"data": self.data, "samples": self.samples, "distill_steps": self.steps,
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

    # -- the two steps ---------------------------------------------------------------------
    def _distill(self, cfg: GenieRunConfig, cancel):
        model, info, split, _ = digits()
        batches = max(1, cfg.samples // max(1, min(cfg.distill_batch, cfg.samples)))
        total = max(1, cfg.distill_steps * batches)

        def on_step(step, loss):
            if cancel.is_set():
                from ..errors import Cancelled
                raise Cancelled("run cancelled")
            self.runner.set_progress(step + 1, total)
            if step % 10 == 0:
                self.runner.say(f"distilling: step {step + 1}/{total}, BN-statistics loss {loss:.3g}")

        torch.manual_seed(cfg.seed)
        self.runner.say(f"calibration images from {SOURCE_LABELS[cfg.data]}")
        return calibration_images(model, cfg, split, torch.device("cpu"), on_step)

    def _quantize(self, cfg: GenieRunConfig, images, cancel) -> dict:
        model, info, split, fp_acc = digits()
        units_done = []

        def on_step(unit, step, loss):
            if cancel.is_set():
                from ..errors import Cancelled
                raise Cancelled("run cancelled")
            if step % 20 == 0:
                self.runner.say(f"{METHOD_LABELS[cfg.method]}: {unit}, step {step}, loss {loss:.3g}")

        n_units = max(1, len(find_units(model)))
        self.runner.set_progress(0, n_units)

        def on_unit(rep):
            units_done.append(rep)
            self.runner.set_progress(len(units_done), n_units)

        result = quantize_model(model, images, cfg.quant_config(), callback=on_step, on_unit=on_unit)
        self.last_units = result.units
        q_acc = accuracy(result.model, split.x_test, split.y_test)
        setting = f"W{cfg.weight_bits}A{cfg.act_bits if cfg.act_bits else 'fp'}"
        return {"setting": setting, "data": cfg.data, "images": int(len(images)), "quantizer": METHOD_LABELS[cfg.method],
                "full precision": fp_acc, "quantized": q_acc, "seconds": round(result.seconds, 1)}

    def _show_images(self, images, source):
        self.images, self.images_source = images, source
        shown = images[: self.show_count]
        self.gallery.show(samples_figure(shown, title=f"{len(shown)} of {len(images)} calibration images "
                                                      f"({SOURCE_LABELS[source]})"))

    def _add_row(self, row: dict):
        self.rows.append(row)
        self.table.show(accuracy_table_figure(self.rows))

    def synthesize(self, wait: bool = True, **settings):
        """Calibration images from the chosen source; returns them when ``wait``."""
        self.runner.check_idle()
        self.set(**settings)
        cfg = self.config()
        self.runner.start(lambda cancel: (self._distill(cfg, cancel), cfg.data),
                          lambda value: self._show_images(*value), "loading the digits model")
        return self._finish(wait, lambda: self.images)

    def quantize(self, wait: bool = True, **settings):
        """Quantize on the current images (synthesized first if there are none or the source changed)."""
        self.runner.check_idle()
        self.set(**settings)
        cfg = self.config()
        reuse = self.images is not None and self.images_source == cfg.data and len(self.images) == cfg.samples

        def work(cancel):
            images = self.images if reuse else self._distill(cfg, cancel)
            if not reuse:
                self._show_images(images, cfg.data)
            return self._quantize(cfg, images, cancel)

        self.runner.start(work, self._add_row, "quantizing")
        return self._finish(wait, lambda: self.rows[-1] if self.rows and self.runner.state == "done" else None)

    def run(self, wait: bool = True, **settings):
        """Synthesize (if needed) and quantize; the new accuracy row when ``wait``."""
        return self.quantize(wait=wait, **settings)
