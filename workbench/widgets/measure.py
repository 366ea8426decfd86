"""Quantize a copy of a cached full-precision model and measure it on held-out windows."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from ..api import QuantizeConfig, quantize
from ..data import calibration_windows, evaluation_windows
from ..diagnostics import Reconstruction, Spectra, hessian_spectra, reconstruction_errors
from ..engine import resolve_device
from ..errors import Cancelled
from ..report import Report
from .common import fast_mode, full_precision, model_lock, working_copy


def heldout_windows() -> int:
    return 2 if fast_mode() else 4


@dataclass
class Outcome:
    """One finished, measured run: the report, held-out errors, and one frame joining them."""
    method: str
    config: QuantizeConfig
    report: Report
    reconstruction: Reconstruction
    layers: pd.DataFrame = field(default=None)

    def __post_init__(self):
        if self.layers is None:
            frame = self.report.to_frame()
            held = self.reconstruction.layers[["name", "rel_error", "rel_error_propagated"]].rename(
                columns={"rel_error": "heldout_rel_error", "rel_error_propagated": "heldout_propagated"})
            frame = frame.merge(held, on="name", how="left")
            frame.insert(0, "method", self.method)
            self.layers = frame

    def summary(self) -> dict:
        r = self.report
        change = None if not (r.ppl_fp and r.ppl_quant) else 100 * (r.ppl_quant / r.ppl_fp - 1)
        blocks = self.reconstruction.blocks
        return {"method": self.method, "ppl_fp": r.ppl_fp, "ppl_quant": r.ppl_quant, "ppl_change_pct": change,
                "quant_seconds": r.quant_seconds, "mean_rel_error": float(self.layers["rel_error"].mean()),
                "mean_attention_error": float(blocks["after_o"].mean()) if len(blocks) else None}


def quantize_and_measure(cfg: QuantizeConfig, on_event=None, cancel=None, heldout: int | None = None) -> Outcome:
    """Quantize a private copy with ``cfg``; the cached full-precision model stays as it was."""
    work = working_copy(cfg.model)
    if cancel is not None and cancel.is_set():
        raise Cancelled("run cancelled")
    result = quantize(cfg, loaded=work, on_event=on_event, cancel=cancel)
    fp = full_precision(cfg.model)
    ids = evaluation_windows(fp.tokenizer, cfg.eval_text, cfg.seqlen, heldout or heldout_windows())
    with model_lock(cfg.model):
        recon = reconstruction_errors(fp.model, result.model, fp.family, ids, batch_size=cfg.batch_size,
                                      device=resolve_device(cfg.device), max_blocks=cfg.max_blocks)
    return Outcome(cfg.method, cfg, result.report, recon)


def spectra_of(cfg: QuantizeConfig, on_block=None, cancel=None, heads: bool = True) -> Spectra:
    """Spectra of the full-precision model on the calibration windows a run with ``cfg`` would use."""
    fp = full_precision(cfg.model)
    ids = calibration_windows(fp.tokenizer, cfg.calib, cfg.calib_samples, cfg.seqlen, cfg.seed)

    def block_done(b, total):
        if on_block is not None:
            on_block(b, total)
        if cancel is not None and cancel.is_set():
            raise Cancelled("run cancelled")

    with model_lock(cfg.model):
        return hessian_spectra(fp.model, fp.family, ids, batch_size=cfg.batch_size, device=resolve_device(cfg.device),
                               max_blocks=cfg.max_blocks, heads=heads, damp=cfg.damp, on_block=block_done)
