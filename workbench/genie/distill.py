"""Genie-D: synthesize calibration images from a trained model's BatchNorm statistics alone.

Three sources share one interface, so the quantizer can compare them:
- "genie":  a generator and its latent inputs, both optimized (Adam) on the BN-statistics loss,
            with swing convolution on the strided convolutions;
- "pixels": the same loss, but the pixels themselves are the parameters (no generator);
- "noise":  Gaussian noise, the floor.
Each batch is distilled from scratch (a fresh generator and latents), as the statistics are
matched per batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import Cancelled, WorkbenchError
from .bn_stats import BNStatsLoss, batchnorm_layers, frozen
from .generator import Generator
from .swing import SwingConv

SOURCES = ("genie", "pixels", "noise")


@dataclass(frozen=True)
class DistillConfig:
    source: str = "genie"
    samples: int = 256
    batch_size: int = 128
    steps: int = 400               # Adam steps per batch
    image_shape: tuple = (1, 16, 16)
    latent_dim: int = 64
    generator_width: int = 32
    lr_generator: float = 1e-2
    lr_latent: float = 5e-2
    lr_pixels: float = 5e-2
    swing: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.source not in SOURCES:
            raise WorkbenchError(f"unknown data source {self.source!r}; choose one of {', '.join(SOURCES)}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise WorkbenchError(f"samples must be a positive integer, got {self.samples!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise WorkbenchError(f"distillation batch size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise WorkbenchError(f"distillation steps must be a non-negative integer, got {self.steps!r}")
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise WorkbenchError(f"image shape is (channels, height, width), got {self.image_shape!r}")


Callback = Callable[[int, float], None]
# (first image's index in the set, steps done over all batches, images [n, C, H, W], batch finished)
ImagesCallback = Callable[[int, int, torch.Tensor, bool], None]


def check_cancel(cancel) -> None:
    """``Cancelled`` once ``cancel`` (anything with ``is_set()``) is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("run cancelled")


def _batches(cfg: DistillConfig) -> list[int]:
    """Batch sizes covering ``samples``; a short remainder joins the previous batch, as the
    statistics of a few images are too noisy to match on their own."""
    sizes = [cfg.batch_size] * (cfg.samples // cfg.batch_size)
    rest = cfg.samples % cfg.batch_size
    if rest:
        if sizes and rest < cfg.batch_size // 2:
            sizes[-1] += rest
        else:
            sizes.append(rest)
    return sizes


def _optimize(model: nn.Module, make_images: Callable[[], torch.Tensor], params: list[dict],
              steps: int, swing: SwingConv, on_step: Callback | None,
              on_images: Callable[[int, torch.Tensor], None] | None = None, image_every: int = 0,
              cancel=None) -> None:
    opt = torch.optim.Adam(params)
    with BNStatsLoss(model) as stats:
        for step in range(steps):
            check_cancel(cancel)
            stats.reset()
            opt.zero_grad(set_to_none=True)
            with swing:
                x = make_images()
                model(x)
            loss = stats.total()
            loss.backward()
            if on_images is not None and image_every > 0 and step % image_every == 0:
                on_images(step, x.detach())     # the images this step's loss was measured on, before the update
            opt.step()
            if on_step is not None:
                on_step(step, float(loss.detach()))


def distill_batch(model: nn.Module, n: int, cfg: DistillConfig, g: torch.Generator,
                  device: torch.device, on_step: Callback | None = None,
                  on_images: Callable[[int, torch.Tensor, bool], None] | None = None, image_every: int = 0,
                  cancel=None) -> torch.Tensor:
    """One batch of ``n`` images from ``cfg.source``; ``g`` drives every random draw.

    ``on_images(step, images, final)`` sees the batch every ``image_every`` steps and when it is done;
    watching draws no random numbers, so it leaves the images as they would be unwatched.
    """
    shape = (n, *cfg.image_shape)
    snap = None if on_images is None else (lambda step, x: on_images(step, x, False))
    if cfg.source == "noise":
        x = torch.randn(shape, generator=g).to(device)
        if on_images is not None:
            on_images(0, x, True)
        return x
    swing = SwingConv(model, generator=g, enabled=cfg.swing)
    if cfg.source == "pixels":
        x = torch.randn(shape, generator=g).to(device).requires_grad_(True)
        _optimize(model, lambda: x, [{"params": [x], "lr": cfg.lr_pixels}], cfg.steps, swing, on_step,
                  snap, image_every, cancel)
        out = x.detach()
    else:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)        # the generator's initial weights
            gen = Generator(cfg.latent_dim, cfg.image_shape, cfg.generator_width).to(device)
        z = torch.randn(n, cfg.latent_dim, generator=g).to(device).requires_grad_(True)
        gen.train()
        _optimize(model, lambda: gen(z),
                  [{"params": gen.parameters(), "lr": cfg.lr_generator}, {"params": [z], "lr": cfg.lr_latent}],
                  cfg.steps, swing, on_step, snap, image_every, cancel)
        with torch.no_grad():
            out = gen(z).detach()
    if on_images is not None:
        on_images(cfg.steps, out, True)
    return out


def distill(model: nn.Module, cfg: DistillConfig = DistillConfig(), callback: Callback | None = None,
            device: str | torch.device = "cpu", *, on_images: ImagesCallback | None = None, image_every: int = 0,
            cancel=None) -> torch.Tensor:
    """``cfg.samples`` calibration images [N, C, H, W] for ``model`` (which must have BatchNorm).

    ``callback(step, loss)`` is called after every optimization step, with steps counted over
    all batches. ``on_images(first, step, images, final)`` sees the batch being distilled every
    ``image_every`` steps (0: only when it is done), ``first`` being its first image's index in the
    set. ``cancel`` (anything with ``is_set()``) stops the run with ``Cancelled`` before the next
    step. The model is left as it was (mode, gradient flags, weights).
    """
    batchnorm_layers(model)            # a clear error before any work
    device = torch.device(device)
    g = torch.Generator().manual_seed(cfg.seed)
    out, done, first = [], 0, 0
    with frozen(model):
        for n in _batches(cfg):
            check_cancel(cancel)
            offset = done
            hook = None if callback is None else (lambda s, l, o=offset: callback(o + s, l))
            shown = None if on_images is None else \
                (lambda s, x, final, o=offset, f=first: on_images(f, o + s, x, final))
            out.append(distill_batch(model, n, cfg, g, device, hook, shown, image_every, cancel))
            done += cfg.steps
            first += n
    return torch.cat(out)
