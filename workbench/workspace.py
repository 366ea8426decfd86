"""The workspace every face works in: models loaded once, runs on private copies, measured outcomes.

- ``ModelCache`` (``MODELS``, shared by the app's sessions, the widgets and ``workbench inspect``)
  loads a full-precision model once. The shared model is never quantized: every run works on
  its own deep copy. Walking a model (spectra, reconstruction) briefly swaps its first block for
  an input catcher, so walks of a shared model hold its lock. Texts are tokenized once per model
  and full-precision perplexities computed once per evaluation set: on a CPU they cost as much as
  quantizing a few blocks.
- ``quantize_copy`` quantizes a private copy; ``run`` adds the measures (perplexity before and
  after, held-out layer and head errors) and returns an ``Outcome`` with its tables; ``spectra``
  computes the Hessian spectra of the shared model. All three stream ``engine.Event`` s to
  ``on_event`` ("phase" events say what they are doing) and stop with ``Cancelled`` at any point,
  evaluation included, once ``cancel.is_set()``.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd

from .api import (QuantizeResult, check_against_model, check_savable, conversion_progress, put_codes, quantize,
                  save)
from .config import QuantizeConfig
from .data import CachingTokenizer, calibration_windows, evaluation_windows
from .diagnostics.reconstruction import Reconstruction, reconstruction_errors
from .diagnostics.spectra import Spectra, hessian_spectra
from .devices import resolve_device
from .engine import Event
from .errors import Cancelled, WorkbenchError
from .evaluate import perplexity
from .models.loading import LoadedModel, load_model
from .progress import phase_progress
from .models.streamed import is_streamed, load_streamed
from .offload import AUTO, DISK
from .offload import choose as choose_offload
from .report import Report
from .rotate import rotate_model

HELDOUT_MAX = 8     # held-out windows for reconstruction errors: those of the perplexity, at most this many


# -- models -------------------------------------------------------------------------------------

POLL = 0.1      # seconds between looks at ``cancel`` while waiting on a lock or a load


class RunSlots:
    """At most ``limit`` heavy runs (quantize, measure, spectra) at once in this process; the others wait
    their turn, and can be cancelled while they wait. Each run copies the model and holds its
    activations, so the app's sessions share a few slots instead of all running at once. A thread that
    holds a slot can take it again (a measured run quantizes inside its own slot)."""

    def __init__(self, limit: int = 2):
        self._cond = threading.Condition()
        self._local = threading.local()
        self.limit, self.active = limit, 0

    def set_limit(self, limit: int):
        if limit < 1:
            raise ValueError(f"at least one run must be allowed, got {limit}")
        with self._cond:
            self.limit = limit
            self._cond.notify_all()

    @contextmanager
    def held(self, cancel=None, on_event=None, what: str = "run"):
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                if self.active >= self.limit:
                    _say(on_event, f"{what}: waiting for a free slot ({self.active} of {self.limit} runs going)")
                while self.active >= self.limit:
                    self._cond.wait(POLL)
                    _check(cancel)
                self.active += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self.active -= 1
                    self._cond.notify()


SLOTS = RunSlots(int(os.environ.get("WORKBENCH_MAX_RUNS", "2")))


@contextmanager
def holding(lock: threading.Lock, cancel=None):
    """``with lock:`` that stops waiting with ``Cancelled`` once ``cancel`` is set."""
    while not lock.acquire(timeout=POLL):
        _check(cancel)
    try:
        yield
    finally:
        lock.release()


@dataclass
class SharedModel:
    loaded: LoadedModel
    lock: threading.Lock = field(default_factory=threading.Lock)
    tokenizer: CachingTokenizer = None
    _perplexities: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.tokenizer is None:
            self.tokenizer = CachingTokenizer(self.loaded.tokenizer)

    def private(self) -> LoadedModel:
        """The shared weights with the shared, thread-safe tokenizer."""
        return dataclasses.replace(self.loaded, tokenizer=self.tokenizer)

    def working_copy(self, cancel=None) -> LoadedModel:
        """A deep copy to quantize in place (of a streamed model: a view, its blocks stay on disk)."""
        if is_streamed(self.loaded.model):
            return dataclasses.replace(self.private(), model=self.loaded.model.view())
        with holding(self.lock, cancel):
            model = copy.deepcopy(self.loaded.model).eval()
        return dataclasses.replace(self.private(), model=model)

    def walkable(self):
        """The model for a walk (spectra, held-out errors): a walk swaps its first block for a moment, so a
        streamed model, which the lock does not guard, is walked through a view of its own."""
        return self.loaded.model.view() if is_streamed(self.loaded.model) else self.loaded.model

    def fp_perplexity(self, key, compute) -> float:
        """The full-precision perplexity for ``key`` (text, windows, device), computed once."""
        if key not in self._perplexities:
            self._perplexities[key] = compute()
        return self._perplexities[key]


class ModelCache:
    """Full-precision models by name, loaded once (one load per name even when two threads ask)."""

    def __init__(self, loader=load_model, capacity: int = 2):
        self._loader, self._capacity = loader, capacity
        self._models: dict[str, SharedModel] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, spec: str, cancel=None, progress=None) -> SharedModel:
        """The cached model; loaded on first use. With ``cancel`` the caller can stop waiting (for the load,
        or for another thread's load of the same model) with ``Cancelled``: the load itself goes on in the
        background and serves the next run. ``progress(done, total)`` is handed to a loader that takes it
        (``load_model``: an embedded model's conversion on first use)."""
        spec = spec.strip()
        with self._guard:
            if spec in self._models:
                return self._models[spec]
        if cancel is None:
            return self._load(spec, progress)
        done: dict = {}

        def load():
            try:
                done["model"] = self._load(spec, progress)
            except BaseException as exc:   # handed to the caller below
                done["error"] = exc
        t = threading.Thread(target=load, name=f"workbench-load-{spec}", daemon=True)
        t.start()
        while t.is_alive():
            _check(cancel)
            t.join(POLL)
        if "error" in done:
            raise done["error"]
        return done["model"]

    def _load(self, spec: str, progress=None) -> SharedModel:
        with self._guard:
            lock = self._loading.setdefault(spec, threading.Lock())
        with lock:
            with self._guard:
                if spec in self._models:
                    return self._models[spec]
            takes = progress is not None and "progress" in inspect.signature(self._loader).parameters
            shared = SharedModel(self._loader(spec, progress=progress) if takes else self._loader(spec))
            with self._guard:
                while len(self._models) >= self._capacity:   # oldest out: models are large
                    self._models.pop(next(iter(self._models)))
                self._models[spec] = shared
            return shared

    def loaded(self, spec: str) -> bool:
        return spec.strip() in self._models

    def clear(self):
        with self._guard:
            self._models.clear()


MODELS = ModelCache()
STREAMED = ModelCache(loader=load_streamed)     # --offload disk: the blocks stay in the checkpoint's files


def cache_for(cfg: QuantizeConfig, models: ModelCache) -> ModelCache:
    """Where ``cfg``'s model comes from: ``models``, or the streamed models when the run is offloaded
    (``auto``: when the run would not fit with the model in memory; one already loaded counts as there)."""
    offload = choose_offload(cfg, copies=1, loaded_already=models.loaded(cfg.model)) \
        if cfg.offload == AUTO else cfg.offload
    return STREAMED if offload == DISK else models


# -- outcomes -------------------------------------------------------------------------------------

def layer_table(method: str, report: Report, recon: Reconstruction) -> pd.DataFrame:
    """The report's per-layer rows with the held-out errors beside them and a method column."""
    frame = report.to_frame()
    held = recon.layers[["name", "rel_error", "rel_error_propagated"]].rename(
        columns={"rel_error": "heldout_rel_error", "rel_error_propagated": "heldout_propagated"})
    frame = frame.merge(held, on="name", how="left")
    frame.insert(0, "method", method)
    return frame


@dataclass
class Outcome:
    """One finished, measured run: the report, the held-out errors, and one frame joining them."""
    config: QuantizeConfig
    report: Report
    reconstruction: Reconstruction
    layers: pd.DataFrame = field(default=None)
    packed: dict | None = field(default=None, repr=False)   # the codes, kept while the run can be saved

    def __post_init__(self):
        if self.layers is None:
            self.layers = layer_table(self.method, self.report, self.reconstruction)

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def name(self) -> str:
        """The run's key among the runs of one comparison: its method, ``-mixed`` for a width per layer."""
        return self.method + ("-mixed" if self.report.plan else "")

    def summary(self) -> dict:
        r = self.report
        change = None if not (r.ppl_fp and r.ppl_quant) else 100 * (r.ppl_quant / r.ppl_fp - 1)
        heads = self.reconstruction.blocks
        return {"method": self.method, "ppl_fp": r.ppl_fp, "ppl_quant": r.ppl_quant, "ppl_change_pct": change,
                "quant_seconds": r.quant_seconds, "mean_rel_error": float(self.layers["rel_error"].mean()),
                "mean_attention_error": float(heads["after_o"].mean()) if len(heads) else None}


def default_heldout(cfg: QuantizeConfig) -> int:
    return HELDOUT_MAX if cfg.eval_windows <= 0 else min(cfg.eval_windows, HELDOUT_MAX)


def spectra_key(cfg: QuantizeConfig) -> tuple:
    """Spectra depend on the model and the calibration windows only."""
    return (cfg.model, cfg.calib, cfg.calib_samples, cfg.seqlen, cfg.seed, cfg.max_blocks, cfg.device, cfg.solver().damp)


# -- runs ---------------------------------------------------------------------------------------

def _say(on_event, message: str):
    if on_event is not None:
        on_event(Event("phase", message=message))


def _check(cancel):
    if cancel is not None and cancel.is_set():
        raise Cancelled("run cancelled")


def quantize_copy(cfg: QuantizeConfig, *, models: ModelCache = MODELS, on_event=None, cancel=None,
                  shared: SharedModel | None = None) -> QuantizeResult:
    """Quantize a private copy of the cached model; its full-precision perplexity is computed once."""
    cfg = cfg.validate()
    models = cache_for(cfg, models) if shared is None else models
    _precheck(cfg, shared or (models.get(cfg.model) if models.loaded(cfg.model) else None))
    with SLOTS.held(cancel, on_event, cfg.method):
        return _quantize_copy(cfg, models, on_event, cancel, shared)


def _precheck(cfg: QuantizeConfig, shared: SharedModel | None):
    """Settings the model cannot take, or a run that cannot fit, refused before waiting for a slot."""
    if shared is not None:
        check_against_model(shared.loaded, cfg, copies=1)


def _quantize_copy(cfg, models, on_event, cancel, shared) -> QuantizeResult:
    if shared is None:
        _say(on_event, f"{cfg.method}: loading {cfg.model}")
        shared = models.get(cfg.model, cancel, conversion_progress(on_event, cfg.model))
    check_against_model(shared.loaded, cfg, copies=1)
    _check(cancel)
    _say(on_event, f"{cfg.method}: copying the model")
    work = shared.working_copy(cancel)
    _check(cancel)
    device = resolve_device(cfg.device)
    evaluate = cfg.eval_windows >= 0
    if evaluate:
        windows = evaluation_windows(work.tokenizer, cfg.eval_text, cfg.seqlen, cfg.eval_windows)
        _say(on_event, f"{cfg.method}: full-precision perplexity")
        # the copy still holds the full-precision weights; every run of this model and text shares the number
        ppl_fp = shared.fp_perplexity((cfg.eval_text, cfg.seqlen, cfg.eval_windows, str(device)),
                                      lambda: perplexity(work.model, windows, device, cfg.batch_size, cancel=cancel,
                                                         progress=phase_progress(
                                                             on_event, f"{cfg.method}: full-precision perplexity",
                                                             "window")))
        work.model.to("cpu")
    _say(on_event, f"{cfg.method}: calibrating")
    result = quantize(dataclasses.replace(cfg, eval_windows=-1), loaded=work, on_event=on_event, cancel=cancel)
    report = result.report
    report.config["eval_windows"] = cfg.eval_windows
    if evaluate:
        _say(on_event, f"{cfg.method}: quantized perplexity")
        report.ppl_fp = ppl_fp
        report.ppl_quant = perplexity(result.model, windows, device, cfg.batch_size, cancel=cancel,
                                      progress=phase_progress(on_event, f"{cfg.method}: quantized perplexity", "window"))
        result.model.to("cpu")
    return result


def run(cfg: QuantizeConfig, *, models: ModelCache = MODELS, on_event=None, cancel=None,
        heldout: int | None = None) -> Outcome:
    """Quantize a private copy and measure it: perplexity before and after, and every layer's and
    head's error against the full-precision model on ``heldout`` windows of the evaluation text."""
    cfg = cfg.validate()
    models = cache_for(cfg, models)
    _precheck(cfg, models.get(cfg.model) if models.loaded(cfg.model) else None)
    with SLOTS.held(cancel, on_event, cfg.method):
        return _run(cfg, models, on_event, cancel, heldout)


def _run(cfg, models, on_event, cancel, heldout) -> Outcome:
    _say(on_event, f"{cfg.method}: loading {cfg.model}")     # said before the load, which may take a while
    shared = models.get(cfg.model, cancel, conversion_progress(on_event, cfg.model))
    result = quantize_copy(cfg, models=models, on_event=on_event, cancel=cancel, shared=shared)
    _say(on_event, f"{cfg.method}: measuring errors on held-out windows")
    ids = evaluation_windows(shared.tokenizer, cfg.eval_text, cfg.seqlen, heldout or default_heldout(cfg))
    _check(cancel)
    reference = shared.walkable()
    if cfg.rotate != "none":    # layer by layer, the rotated run is compared in its own basis: the rotated fp model
        reference = shared.working_copy(cancel).model
        rotate_model(reference, shared.loaded.family, cfg.rotate, cfg.seed)
    with holding(shared.lock, cancel):
        recon = reconstruction_errors(reference, result.model, shared.loaded.family, ids,
                                      batch_size=cfg.batch_size, device=resolve_device(cfg.device),
                                      max_blocks=cfg.max_blocks, cancel=cancel,
                                      progress=phase_progress(on_event, f"{cfg.method}: held-out errors", "block"))
    return Outcome(cfg, result.report, recon, packed=result.packed)


def save_outcome(outcome: Outcome, path, overwrite: bool = False, models: ModelCache = MODELS, on_event=None):
    """Write a finished run as ``workbench quantize --save`` does, in the run's format: the cached
    model with the run's codes in place of its quantized layers. Returns the export's sizes;
    ``on_event`` gets the export's progress events."""
    check_savable(outcome.config)
    if outcome.packed is None:
        raise WorkbenchError("this run's quantized weights are no longer kept; run it again to save it")
    if outcome.report.config.get("offload_resolved") == DISK:     # written block by block from the checkpoint
        shared = STREAMED.get(outcome.config.model)
        model = shared.loaded.model.view(outcome.packed)
        return save(QuantizeResult(model, shared.tokenizer, outcome.report, outcome.packed), outcome.config, path,
                    overwrite)
    work = models.get(outcome.config.model).working_copy()
    put_codes(work.model, outcome.packed)
    return save(QuantizeResult(work.model, work.tokenizer, outcome.report, outcome.packed), outcome.config, path,
                overwrite, on_event=on_event)


def spectra(cfg: QuantizeConfig, *, models: ModelCache = MODELS, on_event=None, cancel=None,
            heads: bool = True) -> Spectra:
    """Spectra of the cached full-precision model on the calibration windows a run with ``cfg`` draws."""
    cfg = cfg.validate()
    models = cache_for(cfg, models)
    with SLOTS.held(cancel, on_event, "spectra"):
        return _spectra(cfg, models, on_event, cancel, heads)


def _spectra(cfg, models, on_event, cancel, heads) -> Spectra:
    _say(on_event, f"loading {cfg.model}")
    shared = models.get(cfg.model, cancel, conversion_progress(on_event, cfg.model))
    check_against_model(shared.loaded, cfg)
    _check(cancel)
    _say(on_event, "tokenizing the calibration text")
    ids = calibration_windows(shared.tokenizer, cfg.calib, cfg.calib_samples, cfg.seqlen, cfg.seed)

    def on_block(b, total):
        if on_event is not None:
            on_event(Event("block_finished", index=b + 1, total=total, block=b))

    _say(on_event, "accumulating Hessians block by block")
    with holding(shared.lock, cancel):
        return hessian_spectra(shared.walkable(), shared.loaded.family, ids, batch_size=cfg.batch_size,
                               device=resolve_device(cfg.device), max_blocks=cfg.max_blocks, heads=heads,
                               damp=cfg.solver().damp, on_block=on_block, cancel=cancel)
