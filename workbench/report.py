"""The run report: settings, perplexities, time, memory and one record per linear layer."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from . import atomic
from .errors import WorkbenchError
from .jsonsafe import dumps, restore


@dataclass
class LayerRecord:
    name: str               # module path in the model, e.g. model.layers.3.self_attn.q_proj
    block: int
    kind: str               # q, k, v, o, gate, up, down, fc1, fc2
    loss: float             # the solver's objective on the calibration statistics
    rel_error: float        # ||W_hat X - W X||^2 / ||W X||^2 on the calibration inputs
    seconds: float
    extra: dict = field(default_factory=dict)   # method-specific measures (e.g. attention error)


@dataclass
class Report:
    model: str
    method: str
    config: dict
    ppl_fp: float | None = None
    ppl_quant: float | None = None
    quant_seconds: float = 0.0
    peak_memory_bytes: int = 0
    layers: list[LayerRecord] = field(default_factory=list)
    timings: dict = field(default_factory=dict)   # seconds by phase (forward, statistics, solve...)
    # by phase (perplexity_fp, quantize, perplexity_quant): peak_rss_bytes (the OS's resident set), weights_bytes
    # and activations_bytes (what the run held in memory at its peak), activations_on_disk_bytes (spilled)
    memory: dict = field(default_factory=dict)
    # mixed precision: each layer's width (``layers``), what chose them (``source``: budget, plan or keep-bits;
    # ``budget``, ``budget_bytes``, ``sensitivity``, per-layer ``costs``) and the plan's ``size_bytes`` and
    # ``avg_bits`` as the pack-quantized export stores it (see ``mixed.setup.make_plan``); empty for one width
    plan: dict = field(default_factory=dict)
    # the scales trained end to end after the block-wise pass (turboboa-tuned): steps, learning rate, the mean
    # next-token loss of the first and the last tenth of the steps; empty for other methods
    end_to_end: dict = field(default_factory=dict)

    @property
    def width(self) -> str:
        """The run's width for a label: ``w4``, or ``mixed 3.48 bits`` for a width per layer (its average
        as stored; the config's ``bits`` then says nothing)."""
        if self.plan:
            return f"mixed {self.plan['avg_bits']:.2f} bits"
        return f"w{self.config.get('bits')}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        d = restore(d)
        d["layers"] = [LayerRecord(**r) for r in d.get("layers", [])]
        return cls(**d)

    def to_frame(self) -> pd.DataFrame:
        """One row per linear layer; method-specific measures become columns."""
        rows = [{**{k: v for k, v in asdict(r).items() if k != "extra"}, **r.extra} for r in self.layers]
        return pd.DataFrame(rows, columns=None if rows else ["name", "block", "kind", "loss", "rel_error", "seconds"])

    def to_json(self, path: str | os.PathLike) -> Path:
        return write_atomic(path, dumps(self.to_dict(), indent=2))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Report":
        return cls.from_dict(json.loads(Path(path).read_text()))


def check_writable(path: str | os.PathLike) -> Path:
    """Fail before any work if ``path`` cannot be written (missing or read-only directory)."""
    path = Path(path).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise WorkbenchError(f"output path {str(path)!r} is a directory; give a file name")
    if not parent.is_dir():
        raise WorkbenchError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise WorkbenchError(f"cannot write {str(path)!r}: directory {str(parent)!r} is not writable")
    return path


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write to a temporary file beside ``path`` and rename it over, so no half-written file remains."""
    return atomic.write_atomic(check_writable(path), text)
