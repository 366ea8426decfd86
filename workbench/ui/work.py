"""What the app's worker threads do: quantize a copy and measure it, or compute spectra."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pandas as pd

from ..api import quantize
from ..data import calibration_windows, evaluation_windows
from ..diagnostics import Reconstruction, Spectra, hessian_spectra, reconstruction_errors
from ..engine import resolve_device
from ..errors import Cancelled
from ..evaluate import perplexity
from ..report import Report
from .models import SharedModel
from .settings import Settings


@dataclass
class Outcome:
    """One finished quantization run, as the tabs show it."""
    method: str
    settings: Settings
    report: Report
    reconstruction: Reconstruction
    layers: pd.DataFrame = field(default=None)

    def __post_init__(self):
        if self.layers is None:
            self.layers = layer_table(self.method, self.report, self.reconstruction)

    def summary(self) -> dict:
        r = self.report
        delta = None if not (r.ppl_fp and r.ppl_quant) else 100 * (r.ppl_quant / r.ppl_fp - 1)
        heads = self.reconstruction.blocks
        return {"method": self.method, "ppl_fp": r.ppl_fp, "ppl_quant": r.ppl_quant, "ppl_change_pct": delta,
                "quant_seconds": r.quant_seconds, "mean_rel_error": float(self.layers["rel_error"].mean()),
                "mean_attention_error": float(heads["after_o"].mean()) if len(heads) else None}


def layer_table(method: str, report: Report, recon: Reconstruction) -> pd.DataFrame:
    """The report's per-layer rows with the held-out errors beside them and a method column."""
    frame = report.to_frame()
    held = recon.layers[["name", "rel_error", "rel_error_propagated"]].rename(
        columns={"rel_error": "heldout_rel_error", "rel_error_propagated": "heldout_propagated"})
    frame = frame.merge(held, on="name", how="left")
    frame.insert(0, "method", method)
    return frame


def quantize_one(shared: SharedModel, settings: Settings, method: str, post, cancel) -> Outcome:
    """Quantize a private copy of the shared model with ``method``; events go to ``post``."""
    cfg = settings.config(method)
    device = resolve_device(cfg.device)
    post("phase", f"{method}: copying the model")
    work = shared.working_copy()
    if cancel.is_set():
        raise Cancelled("run cancelled")
    evaluate = cfg.eval_windows >= 0
    post("phase", f"{method}: tokenizing the evaluation text")
    heldout = evaluation_windows(work.tokenizer, cfg.eval_text, cfg.seqlen, settings.heldout_windows)
    if evaluate:
        windows = evaluation_windows(work.tokenizer, cfg.eval_text, cfg.seqlen, cfg.eval_windows)
        post("phase", f"{method}: full-precision perplexity")
        # the copy still holds the full-precision weights; every run of this model and data shares the number
        ppl_fp = shared.fp_perplexity((cfg.eval_text, cfg.seqlen, cfg.eval_windows, str(device)),
                                      lambda: perplexity(work.model, windows, device, cfg.batch_size))
        work.model.to("cpu")
    post("phase", f"{method}: calibrating")
    # the engine would recompute the full-precision perplexity for every run; it is filled in here instead
    result = quantize(dataclasses.replace(cfg, eval_windows=-1), loaded=work,
                      on_event=lambda ev: post("event", (method, ev)), cancel=cancel)
    report = result.report
    report.config["eval_windows"] = cfg.eval_windows
    if evaluate:
        post("phase", f"{method}: quantized perplexity")
        report.ppl_fp = ppl_fp
        report.ppl_quant = perplexity(result.model, windows, device, cfg.batch_size)
        result.model.to("cpu")
    post("phase", f"{method}: measuring errors on held-out windows")
    with shared.lock:
        recon = reconstruction_errors(shared.loaded.model, result.model, shared.loaded.family, heldout,
                                      batch_size=cfg.batch_size, device=device, max_blocks=cfg.max_blocks)
    return Outcome(method, settings, report, recon)


def spectra_of(shared: SharedModel, settings: Settings, post, cancel) -> Spectra:
    """Spectra of the shared full-precision model on the run's calibration windows."""
    cfg = settings.config("gptq")
    post("phase", "tokenizing the calibration text")
    tok = shared.private().tokenizer
    ids = calibration_windows(tok, cfg.calib, cfg.calib_samples, cfg.seqlen, cfg.seed)

    def on_block(b, total):
        post("block", (b + 1, total))
        if cancel.is_set():
            raise Cancelled("run cancelled")

    post("phase", "accumulating Hessians block by block")
    with shared.lock:
        return hessian_spectra(shared.loaded.model, shared.loaded.family, ids, batch_size=cfg.batch_size,
                               device=resolve_device(cfg.device), max_blocks=cfg.max_blocks, damp=cfg.damp,
                               on_block=on_block)
