"""One Genie run on the digits model: calibration data -> Genie-M -> accuracies and timings.

The CLI, the benchmark and the app all call ``run_genie``; it holds no UI code.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ..devices import check_device, resolve_device
from ..errors import WorkbenchError
from .bn_stats import bn_stats_loss
from .data import DigitsConfig, DigitsSplit, load_digits_split, real_calibration
from .distill import DistillConfig, distill
from .evaluate import accuracy
from .model import DEFAULT_ARCHITECTURE, DEFAULT_WEIGHTS, check_architecture, load_cnn
from .progress import GALLERY, GenieEvent, Watch
from .qlayers import find_units
from .quantize import GenieMConfig, quantize_model

DATA_SOURCES = ("genie", "pixels", "noise", "real")
# The calibration choices the app and the benchmark put side by side, from the floor up:
# a data source, with Genie-D run without and with swing convolution.
SOURCES = ("noise", "pixels", "genie", "genie-swing", "real")
SOURCE_LABELS = {"noise": "noise", "pixels": "pixels", "genie": "Genie-D", "genie-swing": "Genie-D + swing",
                 "real": "real digits"}


@dataclass(frozen=True)
class GenieRunConfig:
    weight_bits: int = 4
    act_bits: int = 0              # 0: float activations
    data: str = "genie"            # genie | pixels | noise | real (few-shot, the digits train split)
    samples: int = 256
    distill_steps: int = 400
    distill_batch: int = 128
    # Swing convolution is off for the digits model: on its 16x16 inputs a one-pixel swing of
    # the 8x8 maps, drawn independently for the main and shortcut branches, fits the images to
    # statistics the unshifted network never sees (BN loss 2.1 vs 0.08 unshifted), and W2A2
    # accuracy was lower with it on both seeds tried (97.8 vs 99.4, 98.6 vs 99.2).
    swing: bool = False
    method: str = "genie"          # genie (Genie-M) | rtn
    iters: int = 1000              # Genie-M steps per block
    ends_bits: int | None = 8      # first conv and last linear; None: same bits as the rest
    seed: int = 0
    device: str = "cpu"
    model: str = str(DEFAULT_WEIGHTS)
    architecture: str = DEFAULT_ARCHITECTURE   # what the weights in ``model`` are loaded as

    def __post_init__(self):
        if self.data not in DATA_SOURCES:
            raise WorkbenchError(f"unknown data source {self.data!r}; choose one of {', '.join(DATA_SOURCES)}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise WorkbenchError(f"samples must be a positive integer, got {self.samples!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed <= 2 ** 32 - 1:
            raise WorkbenchError(f"seed must be a whole number from 0 to {2 ** 32 - 1}, got {self.seed!r}")
        check_device(self.device)
        check_architecture(self.architecture)
        self.quant_config()        # validates bits and method
        if self.data != "real":
            self.distill_config((1, 8, 8))

    def quant_config(self) -> GenieMConfig:
        return GenieMConfig(weight_bits=self.weight_bits, act_bits=self.act_bits, method=self.method,
                            iters=self.iters, ends_bits=self.ends_bits, seed=self.seed)

    def distill_config(self, image_shape: tuple) -> DistillConfig:
        return DistillConfig(source=self.data, samples=self.samples, batch_size=min(self.distill_batch, self.samples),
                             steps=self.distill_steps, image_shape=tuple(image_shape),
                             swing=self.swing, seed=self.seed)

    @property
    def source(self) -> str:
        """The data source as one of ``SOURCES`` (Genie-D with swing is its own choice)."""
        return "genie-swing" if self.data == "genie" and self.swing else self.data

    def with_source(self, source: str) -> "GenieRunConfig":
        if source not in SOURCES:
            raise WorkbenchError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
        return dataclasses.replace(self, data=source.split("-")[0], swing=source == "genie-swing")

    @property
    def setting(self) -> str:
        """``W4A4``, or ``W4`` with float activations (the benchmark's row names)."""
        return f"W{self.weight_bits}" + (f"A{self.act_bits}" if self.act_bits else "")


@dataclass
class GenieRun:
    report: dict
    images: torch.Tensor           # the calibration images (normalized model inputs)
    model: nn.Module               # the quantized model


def calibration_images(model: nn.Module, cfg: GenieRunConfig, split: DigitsSplit, device: torch.device,
                       callback: Callable[[int, float], None] | None = None,
                       watch: Watch | None = None) -> torch.Tensor:
    """``cfg.samples`` images from ``cfg.data``; ``watch`` sees the steps and images as they come."""
    if cfg.data == "real":
        images = real_calibration(split, cfg.samples, cfg.seed)
        if watch is not None:
            shown = watch.on_images(model, device, 0)
            if shown is not None:
                shown(0, 0, images, True)
        return images
    dcfg = cfg.distill_config(tuple(split.x_train.shape[1:]))
    if watch is None:
        return distill(model, dcfg, callback, device).cpu()
    total = watch.distill_total(dcfg)
    on_step = watch.on_distill_step(total)
    both = on_step if callback is None else (lambda s, l: (callback(s, l), on_step(s, l)))
    return distill(model, dcfg, both, device, on_images=watch.on_images(model, device, total),
                   image_every=watch.image_every(dcfg), cancel=watch.cancel).cpu()


@dataclass
class Loaded:
    """A run's model (full precision, eval mode), its metadata and the digits split it is tested on."""
    model: nn.Module
    info: dict
    split: DigitsSplit
    device: torch.device


def load_for_run(cfg: GenieRunConfig) -> Loaded:
    device = resolve_device(cfg.device)
    model, info = load_cnn(cfg.model, cfg.architecture, device=device)
    return Loaded(model, info, load_digits_split(DigitsConfig(**info.get("data", {}))), device)


def plan(watch: Watch, cfg: GenieRunConfig, loaded: Loaded):
    dcfg = None if cfg.data == "real" else cfg.distill_config(tuple(loaded.split.x_train.shape[1:]))
    iters = cfg.iters if cfg.method == "genie" else 0
    watch.emit("plan", total=watch.distill_total(dcfg), names=find_units(loaded.model), iters=iters)


def rtn_baseline(cfg: GenieRunConfig, loaded: Loaded, cancel=None) -> dict:
    """Round to nearest at ``cfg``'s bits, activation ranges from ``cfg.samples`` real digits (its most
    favourable case, as in the benchmark): the row Genie has to beat."""
    t0 = time.perf_counter()
    calib = real_calibration(loaded.split, cfg.samples, cfg.seed)
    qcfg = dataclasses.replace(cfg, method="rtn").quant_config()
    result = quantize_model(loaded.model, calib, qcfg, device=loaded.device, cancel=cancel)
    return {"accuracy": accuracy(result.model, loaded.split.x_test, loaded.split.y_test, device=loaded.device),
            "seconds": time.perf_counter() - t0}


def run_genie(cfg: GenieRunConfig, progress: Callable[[str, int, float], None] | None = None, *,
              on_event: Callable[[GenieEvent], None] | None = None, cancel=None, gallery: int = GALLERY,
              loaded: Loaded | None = None) -> GenieRun:
    """``progress(phase, step, loss)`` with phase "distill" or a block name.

    ``on_event`` receives a ``GenieEvent`` per step (see ``progress.GenieEvent``; the first
    ``gallery`` images come with the model's predictions), ``cancel`` (anything with ``is_set()``)
    stops the run with ``Cancelled`` within a step, ``loaded`` (``load_for_run(cfg)``) saves
    loading the model again. None of them changes the result.
    """
    torch.manual_seed(cfg.seed)
    watch = Watch(on_event, cancel, gallery)
    watch.phase("loading the model")
    loaded = loaded or load_for_run(cfg)
    model, info, split, device = loaded.model, loaded.info, loaded.split, loaded.device
    plan(watch, cfg, loaded)
    t0 = time.perf_counter()
    on_distill = None if progress is None else (lambda s, l: progress("distill", s, l))
    watch.phase(f"calibration images from {SOURCE_LABELS[cfg.source]}")
    images = calibration_images(model, cfg, split, device, on_distill, watch)
    distill_seconds = time.perf_counter() - t0
    on_step, on_unit = watch.unit_callbacks(find_units(model), cfg.iters if cfg.method == "genie" else 0)
    step = on_step if progress is None else (lambda u, s, l: (progress(u, s, l), on_step(u, s, l)))
    watch.phase("Genie-M" if cfg.method == "genie" else "round to nearest")
    result = quantize_model(model, images, cfg.quant_config(), callback=step, device=device, on_unit=on_unit,
                            cancel=cancel)
    watch.phase("evaluating on the digits test split")
    fp_acc = accuracy(model, split.x_test, split.y_test, device=device)
    q_acc = accuracy(result.model, split.x_test, split.y_test, device=device)
    report = {
        "fp_accuracy": fp_acc,
        "quant_accuracy": q_acc,
        "recorded_fp_accuracy": info.get("test_accuracy"),
        "data": cfg.data,
        "distill_seconds": round(distill_seconds, 3),
        "quant_seconds": round(result.seconds, 3),
        "calibration_bn_loss": bn_stats_loss(model, images.to(device)),
        "settings": asdict(cfg) | {"device": str(device)},
        "notes": (f"first conv and last linear (weights and inputs) at {cfg.ends_bits} bits"
                  if cfg.ends_bits else "all layers at the same bit widths"),
        "blocks": [{"name": u.name, "layers": u.layers, "weight_bits": u.weight_bits,
                    "rtn_rel_error": u.start_rel_error, "rel_error": u.rel_error,
                    "seconds": round(u.seconds, 3)} for u in result.units],
        "torch_threads": torch.get_num_threads(),
    }
    return GenieRun(report=report, images=images, model=result.model)
