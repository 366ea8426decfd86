"""One Genie run on the digits model: calibration data -> Genie-M -> accuracies and timings.

The CLI, the benchmark and the app all call ``run_genie``; it holds no UI code.
"""
from __future__ import annotations

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
from .model import DEFAULT_WEIGHTS, load_default_model
from .quantize import GenieMConfig, quantize_model

DATA_SOURCES = ("genie", "pixels", "noise", "real")


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

    def __post_init__(self):
        if self.data not in DATA_SOURCES:
            raise WorkbenchError(f"unknown data source {self.data!r}; choose one of {', '.join(DATA_SOURCES)}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise WorkbenchError(f"samples must be a positive integer, got {self.samples!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed <= 2 ** 32 - 1:
            raise WorkbenchError(f"seed must be a whole number from 0 to {2 ** 32 - 1}, got {self.seed!r}")
        check_device(self.device)
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


@dataclass
class GenieRun:
    report: dict
    images: torch.Tensor           # the calibration images (normalized model inputs)
    model: nn.Module               # the quantized model


def calibration_images(model: nn.Module, cfg: GenieRunConfig, split: DigitsSplit, device: torch.device,
                       callback: Callable[[int, float], None] | None = None) -> torch.Tensor:
    if cfg.data == "real":
        return real_calibration(split, cfg.samples, cfg.seed)
    dcfg = cfg.distill_config(tuple(split.x_train.shape[1:]))
    return distill(model, dcfg, callback, device).cpu()


def run_genie(cfg: GenieRunConfig, progress: Callable[[str, int, float], None] | None = None) -> GenieRun:
    """``progress(phase, step, loss)`` with phase "distill" or a block name."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model, info = load_default_model(cfg.model, device=device)
    split = load_digits_split(DigitsConfig(**info["data"]))
    t0 = time.perf_counter()
    on_distill = None if progress is None else (lambda s, l: progress("distill", s, l))
    images = calibration_images(model, cfg, split, device, on_distill)
    distill_seconds = time.perf_counter() - t0
    result = quantize_model(model, images, cfg.quant_config(), callback=progress, device=device)
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
