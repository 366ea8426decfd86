"""What the forms hold, how they become engine configs, and what is refused before a run starts."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..aespa import INITS, LearnedOptions
from ..api import QuantizeConfig
from ..errors import WorkbenchError
from ..figures.style import method_label
from ..methods import METHODS, method_spec
from ..models.loading import DEFAULT_MODEL

COMPARE_METHODS = ("rtn", "gptq", "boa", "turboboa")
LEARNED_METHODS = ("aespa", "brecq")
TURBO = method_spec("turboboa").solver
LEARNED = LearnedOptions()


@dataclass
class AppDefaults:
    """Initial values of the forms; tests inject tiny settings, the app a quick look at a real model."""
    model: str = DEFAULT_MODEL
    calib: str = "wikitext2"
    calib_samples: int = 8         # small enough that Compare finishes in a minute or two on a CPU
    seqlen: int = 256
    eval_windows: int = 4
    bits: int = 4
    group_size: int = 64
    max_blocks: int = 2            # 0 = all blocks
    method: str = "gptq"
    rows_per_step: int = TURBO.rows_per_step
    dx_alpha: float = TURBO.dx_alpha
    refine_iters: int = TURBO.refine_iters
    iters: int = LEARNED.iters
    lr: float = LEARNED.lr
    init: str = LEARNED.init
    device: str = "auto"
    batch_size: int = 4
    seed: int = 0


@dataclass(frozen=True)
class Settings:
    """The shared settings of one run, hashable: the key of the per-session result caches."""
    model: str
    calib: str
    calib_samples: int
    seqlen: int
    eval_windows: int
    bits: int
    group_size: int
    max_blocks: int | None
    device: str
    batch_size: int
    seed: int
    rows_per_step: int
    dx_alpha: float
    refine_iters: int
    iters: int
    lr: float
    init: str

    @property
    def heldout_windows(self) -> int:
        """Held-out windows for reconstruction errors: those of the perplexity, at most 8."""
        return 8 if self.eval_windows <= 0 else min(self.eval_windows, 8)

    def config(self, method: str) -> QuantizeConfig:
        """The engine config for ``method``; the TurboBoA and learned-rounding options only reach their methods."""
        turbo, learned = method == "turboboa", method in LEARNED_METHODS
        return QuantizeConfig(
            model=self.model, method=method, bits=self.bits, group_size=self.group_size, calib=self.calib,
            calib_samples=self.calib_samples, seqlen=self.seqlen, eval_windows=self.eval_windows,
            max_blocks=self.max_blocks, device=self.device, batch_size=self.batch_size, seed=self.seed,
            rows_per_step=self.rows_per_step if turbo else None, dx_alpha=self.dx_alpha if turbo else None,
            refine_iters=self.refine_iters if turbo else None, iters=self.iters if learned else None,
            lr=self.lr if learned else None, init=self.init if method == "aespa" else None)

    def spectra_key(self) -> tuple:
        """Spectra depend on the model and the calibration windows only."""
        return (self.model, self.calib, self.calib_samples, self.seqlen, self.seed, self.max_blocks, self.device)


def _int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    if value is None or value == "":
        raise WorkbenchError(f"{name} is empty; enter a whole number")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise WorkbenchError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise WorkbenchError(f"{name} must be a whole number, got {value!r}")
    v = int(f)
    if low is not None and v < low:
        raise WorkbenchError(f"{name} must be at least {low}, got {v}")
    if high is not None and v > high:
        raise WorkbenchError(f"{name} must be at most {high}, got {v}")
    return v


def _float(name: str, value, low: float, high: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise WorkbenchError(f"{name} must be a number, got {value!r}") from None
    if not low <= v <= high:
        raise WorkbenchError(f"{name} must be between {low} and {high}, got {v}")
    return v


def make_settings(model, calib, calib_samples, seqlen, eval_windows, bits, group_size, max_blocks, device,
                  rows_per_step, dx_alpha, refine_iters, iters=LEARNED.iters, lr=LEARNED.lr, init=LEARNED.init,
                  batch_size=4, seed=0) -> Settings:
    """Form values to ``Settings``; raises ``WorkbenchError`` naming the field and the fix."""
    model = (model or "").strip()
    if not model:
        raise WorkbenchError("Model is empty: choose the embedded model, a checkpoint directory or a hub id")
    calib = (calib or "").strip()
    if not calib:
        raise WorkbenchError("Calibration text is empty: use wikitext2, a text file or hf:NAME")
    group = _int("Group size", group_size)
    if group != -1 and group < 1:
        raise WorkbenchError(f"Group size must be -1 (one grid per row) or a positive width, got {group}")
    blocks = _int("Max blocks", max_blocks, low=0)
    s = Settings(model=model, calib=calib, calib_samples=_int("Calibration samples", calib_samples, 1, 4096),
                 seqlen=_int("Sequence length", seqlen, 2, 32768),
                 eval_windows=_int("Evaluation windows", eval_windows, -1, 100000),
                 bits=_int("Bits", bits, 2, 8), group_size=group, max_blocks=blocks or None,
                 device=(device or "auto").strip(), batch_size=_int("Batch size", batch_size, 1, 1024),
                 seed=_int("Seed", seed, 0), rows_per_step=_int("Rows per step", rows_per_step, 1, 4096),
                 dx_alpha=_float("dx alpha", dx_alpha, 0.0, 1.0),
                 refine_iters=_int("Refine iterations", refine_iters, 0, 100),
                 iters=_int("Rounding steps", iters, 1, 100000), lr=_float("Learning rate", lr, 1e-6, 10.0),
                 init=_choice("Start from", init, INITS))
    _check_device(s.device)
    for method in (*COMPARE_METHODS, *LEARNED_METHODS):   # the engine's own checks, before any work
        s.config(method).validate()
    return s


def _choice(name: str, value, choices: tuple[str, ...]) -> str:
    v = (value or "").strip().lower()
    if v not in choices:
        raise WorkbenchError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return v


def _check_device(device: str):
    """The engine lets torch reject unknown device strings with a RuntimeError; name the field instead."""
    import torch
    if device == "auto":
        return
    try:
        torch.device(device)
    except RuntimeError:
        raise WorkbenchError(f"Device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def method_choices() -> list[tuple[str, str]]:
    return [(method_label(m), m) for m in METHODS]
