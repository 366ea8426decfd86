"""``workbench.quantize``: load, calibrate, quantize, evaluate, report. Every face calls this."""
from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass, field

import torch

from .attention_hessians import VALUE_OUTPUTS
from .data import DEFAULT_CALIB, DEFAULT_EVAL, calibration_windows, evaluation_windows
from .engine import EngineResult, PackedLayer, make_quantizer, resolve_device
from .errors import WorkbenchError
from .evaluate import perplexity
from .methods import method_spec
from .models.loading import DEFAULT_MODEL, LoadedModel, load_model
from .quant.grid import GridConfig
from .quant.solver import SolverConfig
from .report import Report, check_writable


@dataclass
class QuantizeConfig:
    model: str = DEFAULT_MODEL
    method: str = "gptq"
    bits: int = 4
    group_size: int = 64              # -1: one grid per output channel
    symmetric: bool = False
    grid_search: str | None = None    # "minmax" or "mse" (None: the method's default)
    calib: str = DEFAULT_CALIB        # wikitext2, a text file, or hf:NAME[:CONFIG[:SPLIT[:FIELD]]]
    calib_samples: int = 32
    seqlen: int = 512
    eval_text: str = DEFAULT_EVAL
    eval_windows: int = 40            # 0: all windows; -1: skip evaluation
    seed: int = 0
    device: str = "auto"
    batch_size: int = 4               # sequences per forward chunk
    max_blocks: int | None = None     # quantize only the first N blocks (quick looks)
    damp: float = 0.01
    act_order: bool | None = None     # columns by descending Hessian diagonal (None: the method's default)
    block_size: int = 128
    # BoA / TurboBoA (None: the method's default)
    rows_per_step: int | None = None  # rows of every head quantized jointly (1 = BoA)
    dx_alpha: float | None = None     # strength of the correction for inherited errors (0 = off)
    refine_iters: int | None = None   # coordinate-descent sweeps over the scales after rounding
    grid_at_start: bool | None = None # grids from the initial weights instead of when a row is reached
    value_output: str = "identity"    # value projection's output factor: identity or o_proj
    measure_batches: int = 2          # calibration batches for the attention error of q/k/v
    # learned rounding, aespa / brecq (None: the default of LearnedOptions)
    iters: int | None = None          # optimizer steps per layer (aespa) or per block (brecq)
    lr: float | None = None           # Adam learning rate of the rounding variables
    init: str | None = None           # starting rounding for aespa: rtn, gptq or boa

    def grid(self) -> GridConfig:
        return GridConfig(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                          search=self.grid_search or method_spec(self.method).grid_search)

    def solver(self) -> SolverConfig:
        base = method_spec(self.method).solver or SolverConfig()
        chosen = {k: getattr(self, k) for k in ("rows_per_step", "dx_alpha", "refine_iters", "grid_at_start",
                                                "act_order") if getattr(self, k) is not None}
        return dataclasses.replace(base, damp=self.damp, block_size=self.block_size, **chosen)

    def learned(self) -> dict:
        """Options of the learned-rounding methods, checked; only those set."""
        from .aespa import LearnedOptions
        chosen = {k: getattr(self, k) for k in ("iters", "lr", "init") if getattr(self, k) is not None}
        LearnedOptions(**chosen)
        return chosen

    def validate(self):
        self.grid()
        spec = method_spec(self.method)
        learned = self.learned()
        if learned and spec.learned is None:
            raise WorkbenchError(f"--{', --'.join(learned)} apply to the learned-rounding methods (aespa, brecq), "
                                 f"not {self.method}")
        if learned.get("init", "rtn") != "rtn" and spec.learned != "layer":
            raise WorkbenchError(f"--init {learned['init']} is for aespa; {self.method} starts from round to nearest")
        if self.calib_samples < 1:
            raise WorkbenchError(f"--calib-samples must be at least 1, got {self.calib_samples}")
        if self.seqlen < 2:
            raise WorkbenchError(f"--seqlen must be at least 2, got {self.seqlen}")
        if self.eval_windows < -1:
            raise WorkbenchError(f"--eval-windows must be >= 0 (0 = all, -1 = skip), got {self.eval_windows}")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise WorkbenchError(f"--max-blocks must be at least 1, got {self.max_blocks}")
        if not 0 <= self.damp < 1:
            raise WorkbenchError(f"--damp must be in [0, 1), got {self.damp}")
        if self.rows_per_step is not None and self.rows_per_step < 1:
            raise WorkbenchError(f"--rows-per-step must be at least 1, got {self.rows_per_step}")
        if self.dx_alpha is not None and not 0 <= self.dx_alpha <= 1:
            raise WorkbenchError(f"--dx-alpha must be in [0, 1], got {self.dx_alpha}")
        if self.refine_iters is not None and self.refine_iters < 0:
            raise WorkbenchError(f"--refine-iters must be >= 0, got {self.refine_iters}")
        if self.value_output not in VALUE_OUTPUTS:
            raise WorkbenchError(f"--value-output must be one of {', '.join(VALUE_OUTPUTS)}, got {self.value_output!r}")
        if self.dx_alpha and not method_spec(self.method).fp_stream:
            raise WorkbenchError(f"--dx-alpha needs the full-precision stream, which {self.method} does not run; "
                                 f"use --method turboboa")
        resolve_device(self.device)


@dataclass
class QuantizeResult:
    model: torch.nn.Module
    tokenizer: object
    report: Report
    packed: dict[str, PackedLayer] = field(default_factory=dict)

    def __iter__(self):   # model, report = workbench.quantize(...)
        return iter((self.model, self.report))


_FP_PERPLEXITY: dict[tuple, float] = {}   # (source, eval text, seqlen, windows, device) -> ppl


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def quantize(config: QuantizeConfig | None = None, *, loaded: LoadedModel | None = None, on_event=None,
             cancel=None, report_path=None, save_dir=None, overwrite: bool = False, **overrides) -> QuantizeResult:
    """Quantize ``config.model`` with ``config.method``; keyword overrides patch the config.

    ``loaded`` reuses a model already in memory (it is modified in place). ``on_event`` gets an
    ``engine.Event`` per layer; ``cancel`` (anything with ``is_set()``) stops between layers.
    ``report_path`` gets the JSON report, ``save_dir`` the quantized checkpoint (see ``export``).
    """
    cfg = dataclasses.replace(config or QuantizeConfig(), **overrides)
    cfg.validate()
    if report_path is not None:
        check_writable(report_path)
    if save_dir is not None:
        from .export import check_save_dir
        check_save_dir(save_dir, overwrite)
    device = resolve_device(cfg.device)
    fresh = loaded is None          # weights straight from disk: their FP perplexity can be reused
    loaded = loaded or load_model(cfg.model)
    _check_group_size(loaded, cfg.grid())
    tok = loaded.tokenizer
    calib = calibration_windows(tok, cfg.calib, cfg.calib_samples, cfg.seqlen, cfg.seed)
    evalw = None if cfg.eval_windows < 0 else evaluation_windows(tok, cfg.eval_text, cfg.seqlen, cfg.eval_windows)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)

    ppl_fp = None
    if evalw is not None:
        key = (loaded.source, cfg.eval_text, cfg.seqlen, cfg.eval_windows, str(device))
        ppl_fp = _FP_PERPLEXITY.get(key) if fresh else None
        if ppl_fp is None:
            ppl_fp = perplexity(loaded.model, evalw, device, cfg.batch_size)
            if fresh:
                _FP_PERPLEXITY[key] = ppl_fp
    loaded.model.to("cpu")
    spec = method_spec(cfg.method)
    engine = make_quantizer(loaded.model, loaded.family, spec, cfg.grid(), cfg.solver(), device,
                            cfg.batch_size, cfg.max_blocks, on_event, cancel,
                            options={"value_output": cfg.value_output, "measure_batches": cfg.measure_batches,
                                     "learned": {"seed": cfg.seed, **cfg.learned()}})
    t0 = time.perf_counter()
    result: EngineResult = engine.run(calib)
    quant_seconds = time.perf_counter() - t0 - result.timings["measure"]   # measuring is not quantizing
    ppl_q = None if evalw is None else perplexity(loaded.model, evalw, device, cfg.batch_size)
    loaded.model.to("cpu")

    report = Report(model=cfg.model, method=cfg.method,
                    config={**dataclasses.asdict(cfg), "solver": dataclasses.asdict(cfg.solver()),
                            "device_resolved": str(device), "torch": torch.__version__},
                    ppl_fp=ppl_fp, ppl_quant=ppl_q, quant_seconds=quant_seconds,
                    peak_memory_bytes=peak_memory(device), layers=result.layers, timings=result.timings)
    out = QuantizeResult(loaded.model, tok, report, result.packed)
    if save_dir is not None:
        from .export import save_quantized
        save_quantized(out, save_dir, overwrite=overwrite)
    if report_path is not None:
        report.to_json(report_path)
    return out


def _check_group_size(loaded: LoadedModel, grid: GridConfig):
    """Refuse, before any work, a group size that does not divide some layer's input width."""
    block = loaded.family.blocks(loaded.model)[0]
    for kind in loaded.family.linears:
        grid.group_width(loaded.family.linear(block, kind).in_features)
