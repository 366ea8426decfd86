"""What a Genie run says while it goes (``GenieEvent``), and a consumer's running picture of it.

``Watch`` turns the pipeline's callbacks (distillation steps and images, Genie-M steps and
units) into events for one ``on_event`` and carries the ``cancel`` flag. ``GenieTrace`` folds
the events back into what a page or a widget shows: the BN-loss curve, the first images with
the full-precision model's predictions, the finished blocks and the overall progress.
Watching changes no result: it draws no random numbers and predicts on its own copy of the model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .distill import DistillConfig, _batches, check_cancel
from .evaluate import predictions
from .quantize import UnitReport

GALLERY = 32           # images sent with "images" events by default: the first ones of the set
SNAPSHOTS = 20         # images events per distilled batch, besides the finished batch


@dataclass
class GenieEvent:
    """One step of a run. Kinds and the fields they fill:

    - ``phase``: ``message`` (what the run does now);
    - ``plan``: ``total`` distillation steps, ``names`` of the Genie-M units, ``iters`` per unit;
    - ``distill_step``: ``step`` steps done of ``total`` (over all batches), BN-statistics ``loss``;
    - ``images``: images ``offset`` .. ``offset + len(images)`` of the set (the first ``gallery``
      only), the model's predicted ``classes`` and their ``confidence``, at ``step``; ``final``
      once their batch is done;
    - ``unit_step``: ``unit`` (``index`` units finished before it), ``step`` of ``iters``, ``loss``;
    - ``unit_finished``: ``unit``, ``index`` units finished of ``units``, ``rel_error`` after and
      ``start_rel_error`` with round-to-nearest weights, ``seconds``.
    """
    kind: str
    message: str | None = None
    step: int = 0
    total: int = 0
    loss: float | None = None
    names: list[str] | None = None
    iters: int = 0
    offset: int = 0
    images: torch.Tensor | None = None
    classes: list[int] | None = None
    confidence: list[float] | None = None
    final: bool = False
    unit: str | None = None
    index: int = 0
    units: int = 0
    rel_error: float | None = None
    start_rel_error: float | None = None
    seconds: float | None = None


def viewer_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without hooks, to predict on while the original is being distilled
    through (its BN-loss and swing hooks would otherwise see the extra passes)."""
    viewer = copy.deepcopy(model)
    for m in viewer.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return viewer.eval()


class Watch:
    """Callbacks for one run that post ``GenieEvent``\\ s to ``on_event`` and stop on ``cancel``."""

    def __init__(self, on_event: Callable[[GenieEvent], None] | None = None, cancel=None,
                 gallery: int = GALLERY, snapshots: int = SNAPSHOTS):
        self.on_event, self.cancel = on_event, cancel
        self.gallery, self.snapshots = max(0, int(gallery)), max(0, int(snapshots))

    def emit(self, kind: str, **fields):
        if self.on_event is not None:
            self.on_event(GenieEvent(kind, **fields))

    def check(self):
        check_cancel(self.cancel)

    def phase(self, message: str):
        self.check()
        self.emit("phase", message=message)

    # -- distillation -------------------------------------------------------------------------
    def distill_total(self, cfg: DistillConfig | None) -> int:
        return 0 if cfg is None or cfg.source == "noise" else cfg.steps * len(_batches(cfg))

    def image_every(self, cfg: DistillConfig) -> int:
        return 0 if not self.snapshots else max(1, cfg.steps // self.snapshots)

    def on_distill_step(self, total: int):
        return lambda step, loss: self.emit("distill_step", step=step + 1, total=total, loss=loss)

    def on_images(self, model: nn.Module, device, total: int):
        """``distill``'s ``on_images``: the first ``gallery`` images with the model's predictions."""
        if self.on_event is None or self.gallery == 0:
            return None
        viewer = viewer_copy(model)

        def shown(first: int, step: int, x: torch.Tensor, final: bool):
            if first >= self.gallery:
                return
            x = x[: self.gallery - first].detach()
            classes, confidence = predictions(viewer, x, device=device)
            self.emit("images", offset=first, images=x.to("cpu", torch.float32, copy=True), step=step,
                      total=total, classes=classes.tolist(), confidence=confidence.tolist(), final=final)
        return shown

    # -- Genie-M ------------------------------------------------------------------------------
    def unit_callbacks(self, names: list[str], iters: int):
        """``quantize_model``'s ``callback`` and ``on_unit``."""
        done = []

        def on_step(unit: str, step: int, loss: float):
            self.emit("unit_step", unit=unit, index=len(done), units=len(names), step=step + 1, iters=iters,
                      loss=loss)

        def on_unit(rep: UnitReport):
            done.append(rep.name)
            self.emit("unit_finished", unit=rep.name, index=len(done), units=len(names), rel_error=rep.rel_error,
                      start_rel_error=rep.start_rel_error, seconds=rep.seconds)
        return on_step, on_unit


@dataclass
class GenieTrace:
    """The events of a run folded into what is shown; ``add`` returns the kind of change."""
    gallery: int = GALLERY
    phase: str = "starting"
    distill_total: int = 0
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)      # Genie-M units, in order
    iters: int = 0
    units: list[dict] = field(default_factory=list)     # finished units: name, start_rel_error, rel_error, seconds
    unit: str | None = None                             # the unit being optimized, None between units
    unit_step: int = 0
    batches: dict = field(default_factory=dict)         # offset -> (images, classes, confidence, final)
    last: str = "phase"                                 # the kind of the latest event that changes the label

    def add(self, ev: GenieEvent) -> str | None:
        if ev.kind == "phase":
            self.phase = ev.message or self.phase
        elif ev.kind == "plan":
            self.distill_total, self.names, self.iters = ev.total, list(ev.names or []), ev.iters
        elif ev.kind == "distill_step":
            self.distill_total = ev.total or self.distill_total
            self.steps.append(ev.step)
            self.losses.append(ev.loss)
        elif ev.kind == "images":
            self.batches[ev.offset] = (ev.images, ev.classes, ev.confidence, ev.final)
            return ev.kind
        elif ev.kind == "unit_step":
            self.unit, self.unit_step = ev.unit, ev.step
        elif ev.kind == "unit_finished":
            self.unit, self.unit_step = None, 0
            self.units.append({"name": ev.unit, "start_rel_error": ev.start_rel_error, "rel_error": ev.rel_error,
                               "seconds": ev.seconds})
        else:
            return None
        self.last = ev.kind
        return ev.kind

    def shown(self) -> tuple[torch.Tensor | None, list[int], list[float]]:
        """The first ``gallery`` images so far, in set order, with their predictions."""
        images, classes, confidence = [], [], []
        for offset in sorted(self.batches):
            x, c, p, _ = self.batches[offset]
            images.append(x)
            classes += list(c)
            confidence += list(p)
        if not images:
            return None, [], []
        return torch.cat(images)[: self.gallery], classes[: self.gallery], confidence[: self.gallery]

    def progress(self) -> tuple[int, int]:
        """Work done and in all: distillation steps, then each unit's steps (1 per unit without any)."""
        per_unit = max(self.iters, 1)
        in_unit = 0 if self.unit is None else min(self.unit_step, per_unit)
        done = (self.steps[-1] if self.steps else 0) + len(self.units) * per_unit + in_unit
        return done, self.distill_total + len(self.names) * per_unit

    def label(self) -> str:
        n = len(self.names) or "?"
        if self.last == "unit_step":
            return f"Genie-M: block {len(self.units) + 1}/{n} ({self.unit}), step {self.unit_step}/{self.iters}"
        if self.last == "unit_finished":
            u = self.units[-1]
            return (f"Genie-M: {len(self.units)}/{n} blocks, {u['name']} error {u['start_rel_error']:.3g} "
                    f"(round to nearest) -> {u['rel_error']:.3g}")
        if self.last == "distill_step":
            return f"distilling: step {self.steps[-1]}/{self.distill_total}, BN-statistics loss {self.losses[-1]:.3g}"
        return self.phase
