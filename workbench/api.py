"""``workbench.quantize``: load, calibrate, quantize, evaluate, report. Every face calls this."""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .activations import ActivationPool
from .config import QuantizeConfig
from .data import calibration_windows, evaluation_windows
from .devices import resolve_device
from .distributed import from_environment
from .engine import BlockQuantizer, EngineResult, Event
from .errors import WorkbenchError
from .evaluate import perplexity
from .export import FORMAT_FAKE, FORMAT_PACKED, check_save_dir, save_fake_quant, save_quantized
from .export_gguf import check_gguf_model, save_gguf
from .export_stream import StreamingExport, save_streamed
from .memory import PeakMeter, Phases, check_fits, estimate
from .methods import ScaleTuning, method_spec
from .methods.scale_tuning import train_end_to_end
from .mixed.plan import write_plan
from .mixed.setup import Request, make_plan, request_of, widths_of
from .models.loading import LoadedModel, cache_root, load_model
from .models.streamed import is_streamed, load_streamed
from .offload import DISK, DiskBlocks
from .offload import choose as choose_offload
from .packed_spill import PackedSpill
from .patterns import matches
from .progress import phase_progress
from .quant.activation import OFF as ACT_OFF
from .quant.grid import GridConfig
from .quant.weight import QuantizedWeight
from .report import Report, check_writable
from .rotate import check_rotatable, rotate_model
from .transformed import install as install_activation_quantizers


@dataclass
class QuantizeResult:
    model: torch.nn.Module
    tokenizer: object
    report: Report
    packed: dict[str, QuantizedWeight] = field(default_factory=dict)

    def __iter__(self):   # model, report = workbench.quantize(...)
        return iter((self.model, self.report))


_FP_PERPLEXITY: dict[tuple, float] = {}   # (source, eval text, seqlen, windows, device, streamed) -> ppl


def quantize(config: QuantizeConfig | None = None, *, loaded: LoadedModel | None = None, on_event=None,
             cancel=None, report_path=None, save_dir=None, overwrite: bool = False, plan_out=None,
             **overrides) -> QuantizeResult:
    """Quantize ``config.model`` with ``config.method``; keyword overrides patch the config.

    ``loaded`` reuses a model already in memory (it is modified in place). ``on_event`` gets an
    ``engine.Event`` per layer; ``cancel`` (anything with ``is_set()``) stops between layers and
    between evaluation batches. ``report_path`` gets the JSON report, ``save_dir`` the quantized
    checkpoint (see ``export``), ``plan_out`` the widths of a mixed-precision run as a plan file
    (see ``mixed.plan``).
    """
    cfg = dataclasses.replace(config or QuantizeConfig(), **overrides).validate()
    if report_path is not None:
        check_writable(report_path)
    if plan_out is not None:
        if not cfg.mixed:
            raise WorkbenchError("--plan-out writes the widths of a mixed-precision run; give --avg-bits, --max-size, "
                                 "--plan or --keep-bits, or leave --plan-out out")
        check_writable(plan_out)
    if save_dir is not None:
        check_savable(cfg)
        check_save_dir(save_dir, overwrite, packed=cfg.format == FORMAT_PACKED,
                       bits=widths_of(cfg) if cfg.format == FORMAT_PACKED else None, keep=sources(cfg.model))
    device = resolve_device(cfg.device)
    ranks = from_environment()
    if ranks.active and method_spec(cfg.method).block is not None:
        raise WorkbenchError(f"{cfg.method} trains each block on its windows and is not data-parallel; run it "
                             f"in one process (without torchrun)")
    offload = choose_offload(cfg, loaded)
    if offload == DISK and method_spec(cfg.method).tunes_scales:
        raise WorkbenchError(f"{cfg.method} trains the scales of the whole model at once, so it needs the model in "
                             f"memory, and this one would be read from disk a block at a time; use another method or "
                             f"--offload none on a machine with more memory")
    if offload == DISK and cfg.transforms_activations:
        raise WorkbenchError("the model does not fit in memory, so it would be read from disk a block at a time, and "
                             "--rotate, --act-bits and --kv-bits set up the whole model; run without them")
    if offload == DISK and cfg.mixed:
        raise WorkbenchError("the model does not fit in memory, so it would be read from disk a block at a time, and "
                             "mixed precision runs with the model in memory; run without --avg-bits, --max-size, "
                             "--plan and --keep-bits")
    fresh = loaded is None          # weights straight from disk: their FP perplexity can be reused
    if loaded is None:
        _say(on_event, f"loading {cfg.model}")
        loaded = (load_streamed(cfg.model) if offload == DISK
                  else load_model(cfg.model, progress=conversion_progress(on_event, cfg.model)))
    streamed = is_streamed(loaded.model)
    request = check_against_model(loaded, cfg)
    tok = loaded.tokenizer
    calib = calibration_windows(tok, cfg.calib, cfg.calib_samples, cfg.seqlen, cfg.seed)
    if ranks.active and calib.shape[0] <= (ranks.world - 1) * cfg.batch_size:
        # the windows go out a batch at a time, so that each rank's batches are the one-process run's
        raise WorkbenchError(f"--calib-samples {calib.shape[0]} leaves some of the {ranks.world} processes without a "
                             f"batch of --batch-size {cfg.batch_size}; use more than "
                             f"{(ranks.world - 1) * cfg.batch_size} windows or a smaller --batch-size")
    evalw = None if cfg.eval_windows < 0 else evaluation_windows(tok, cfg.eval_text, cfg.seqlen, cfg.eval_windows)
    meter = PeakMeter(device).start()     # this run's own peak, not the process's since it started
    pool = ActivationPool.of_gigabytes(cfg.activation_memory)
    phases = Phases(loaded.model.residency if streamed else _weight_bytes(loaded.model), pool)
    torch.manual_seed(cfg.seed)
    export = None
    try:
        ppl_fp = None
        if evalw is not None:
            key = (loaded.source, cfg.eval_text, cfg.seqlen, cfg.eval_windows, str(device), streamed)
            ppl_fp = _FP_PERPLEXITY.get(key) if fresh else None
            if ppl_fp is None:
                with phases("perplexity_fp"):
                    ppl_fp = perplexity(loaded.model, evalw, device, cfg.batch_size, cancel=cancel, ranks=ranks,
                                        pool=pool, progress=phase_progress(
                                            on_event, f"{cfg.method}: full-precision perplexity", "window"))
                if fresh:
                    _FP_PERPLEXITY[key] = ppl_fp
        loaded.model.to("cpu")
        plan, plan_seconds = None, {}
        if request is not None:     # a budget measures the layers' sensitivity: a phase of its own
            with phases("sensitivity") if request.budget is not None else contextlib.nullcontext():
                plan, plan_seconds = make_plan(request, loaded.model, loaded.family, ranks.share(calib, cfg.batch_size),
                                               cfg, device, ranks, on_event, cancel)
        transforms = transform_activations(loaded, cfg)
        # offloaded: the engine walks its own view of the checkpoint, the codes go to disk as they are made,
        # and with --save each finished block into the export
        work = loaded.model.view() if streamed else loaded.model
        packed = PackedSpill() if streamed else None
        if streamed and save_dir is not None and ranks.leader:
            export = StreamingExport(work, tok, save_dir, cfg.format, packed, cfg.grid(), overwrite)
        spec = method_spec(cfg.method)
        engine = BlockQuantizer(work, loaded.family, spec, cfg.grid(), cfg.solver(), device,
                                cfg.batch_size, cfg.max_blocks, on_event, cancel,
                                options={"value_output": cfg.value_output, "measure_batches": cfg.measure_batches,
                                         "learned": {"seed": cfg.seed, **cfg.learned()}, "ignore": cfg.ignore,
                                         "tuning": {"seed": cfg.seed, **cfg.tuning()},
                                         "act_clip_search": cfg.act_bits < ACT_OFF and cfg.act_clip is None},
                                ranks=ranks, store=DiskBlocks(work, export) if streamed else None,
                                activations=pool, packed=packed, plan=None if plan is None else plan.bits)
        t0 = time.perf_counter()
        with phases("quantize"):
            result: EngineResult = engine.run(ranks.share(calib, cfg.batch_size))
            end_to_end = {}
            if spec.tunes_scales:
                t1 = time.perf_counter()
                end_to_end = train_end_to_end(work, result.packed, calib, ScaleTuning(seed=cfg.seed, **cfg.tuning()),
                                              device, phase_progress(on_event, f"{cfg.method}: scales trained end to "
                                                                     "end", "step"), engine.check_cancel)
                result.timings["end_to_end"] = time.perf_counter() - t1
        quant_seconds = time.perf_counter() - t0 - result.timings["measure"]   # measuring is not quantizing
        model_q = work.view(result.packed) if streamed else loaded.model
        ppl_q = None
        if evalw is not None:
            with phases("perplexity_quant"):
                ppl_q = perplexity(model_q, evalw, device, cfg.batch_size, cancel=cancel, ranks=ranks, pool=pool,
                                   progress=phase_progress(on_event, f"{cfg.method}: quantized perplexity", "window"))
        loaded.model.to("cpu")

        report = Report(model=cfg.model, method=cfg.method,
                        config={**dataclasses.asdict(cfg), "solver": dataclasses.asdict(cfg.solver()),
                                "device_resolved": str(device), "torch": torch.__version__, "processes": ranks.world,
                                "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
                                "offload_resolved": offload, **transforms},
                        ppl_fp=ppl_fp, ppl_quant=ppl_q, quant_seconds=quant_seconds,
                        peak_memory_bytes=meter.stop(), layers=result.layers,
                        timings={**result.timings, **plan_seconds}, memory=phases.record,
                        plan={} if plan is None else plan.record, end_to_end=end_to_end)
        out = QuantizeResult(model_q, tok, report, result.packed)
        if not ranks.leader:     # every rank holds the same model; one writes it
            return out
        # the report first: it is small and sure to be written, and says what the run was if the save fails
        if report_path is not None:
            report.to_json(report_path)
        if plan_out is not None:
            write_plan(plan_out, plan)
        if export is not None:
            export.finish(cancel)
        elif save_dir is not None:
            save(out, cfg, save_dir, overwrite, on_event=on_event)
        return out
    except BaseException:
        if export is not None:
            export.abort()
        raise
    finally:
        pool.close()


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def transform_activations(loaded: LoadedModel, cfg: QuantizeConfig) -> dict:
    """Rotate the model and put the activation and KV quantizers on the layers the run quantizes, as
    ``cfg`` asks; returns what the report records of it (which rotation each size got)."""
    if not cfg.transforms_activations:
        return {}
    family, model = loaded.family, loaded.model
    found = {}
    if cfg.rotate != "none":
        found["rotation"] = rotate_model(model, family, cfg.rotate, cfg.seed)
    n = len(family.blocks(model)) if cfg.max_blocks is None else min(cfg.max_blocks, len(family.blocks(model)))
    layers = [(b, k) for b in range(n) for k in family.linears if not matches(family.layer_name(b, k), cfg.ignore)]
    install_activation_quantizers(model, family, layers, cfg.activations(), cfg.kv_cache())
    return found


def rebuild_transformed(work: LoadedModel, cfg: QuantizeConfig, layers, packed: dict) -> torch.nn.Module:
    """A run that transforms activations, rebuilt on ``work`` (a private full-precision copy, changed in
    place) from its codes: rotated and given its quantizers as the run did, each with the clip the run chose
    (``layers``: the report's records)."""
    transform_activations(work, cfg)
    put_codes(work.model, packed)
    for r in layers:
        if "act_clip" in r.extra:
            layer = work.model.get_submodule(r.name)
            layer.act = dataclasses.replace(layer.act, clip=r.extra["act_clip"])
    return work.model.eval()


def put_codes(model: torch.nn.Module, packed: dict):
    """Each layer of ``packed`` in ``model`` takes its dequantized codes as its weight (in place)."""
    for name, q in packed.items():
        layer = model.get_submodule(name)
        layer.weight.data = q.dequantize().to(layer.weight.dtype)


def check_savable(cfg: QuantizeConfig, face: str = "api"):
    """The checkpoint formats carry weights; a run that also changes the forward cannot be written as one."""
    from .config import SETTINGS
    if cfg.transforms_activations:
        names = ", ".join(SETTINGS[n].who(face) for n in ("rotate", "act_bits", "kv_bits"))
        raise WorkbenchError(f"this run rotates or quantizes activations at run time ({names}), which the checkpoint "
                             f"formats do not carry: its weights alone would compute a different model; save a run "
                             f"without those settings")


def save(result: QuantizeResult, cfg: QuantizeConfig, path, overwrite: bool = False, cancel=None, on_event=None):
    """Write the run in ``cfg.format``; returns the export's sizes. An offloaded run is written block by
    block from its checkpoint and codes. ``on_event`` gets progress events."""
    check_savable(cfg)
    progress = phase_progress(on_event, f"saving {cfg.format}", "tensor")
    if is_streamed(result.model):
        return save_streamed(result.model, result.tokenizer, result.packed, path, cfg.format, cfg.grid(), overwrite,
                             cancel)
    if cfg.gguf_type is not None:
        return save_gguf(result, path, overwrite=overwrite, progress=progress)
    if cfg.format == FORMAT_FAKE:
        return save_fake_quant(result, path, overwrite=overwrite, progress=progress)
    return save_quantized(result, path, overwrite=overwrite, progress=progress)


def conversion_progress(on_event, model: str):
    """Progress of an embedded model's conversion on first use (the only slow part of a load)."""
    return phase_progress(on_event, f"converting the embedded {model} to float32 (first use only)", "step")


def _say(on_event, message: str):
    if on_event is not None:
        on_event(Event("phase", message=message))


def sources(model: str) -> tuple[Path, ...]:
    """Directories a save must never replace: ``model``'s own, when it is one, and the embedded models' cache."""
    found = [cache_root()]
    path = Path(model).expanduser()
    if path.is_dir():
        found.append(path)
    return tuple(found)


def check_against_model(loaded: LoadedModel, cfg: QuantizeConfig, face: str = "api", copies: int = 0) -> Request | None:
    """Refuse, before any work, settings the loaded model cannot take, and a run that would not fit in
    memory (``copies``: working copies of the model the run makes). Returns the widths a mixed-precision
    run asks for (None for one width)."""
    _check_group_size(loaded, cfg.grid())
    if cfg.gguf_type is not None:
        check_gguf_model(loaded.model)
    _check_ignore(loaded, cfg.ignore)
    if cfg.rotate != "none":
        from .config import SETTINGS
        check_rotatable(loaded.family, SETTINGS["rotate"].who(face))
    _check_seqlen(loaded, cfg.seqlen, face)
    _check_memory(loaded, cfg, face, copies)
    return request_of(loaded.model, loaded.family, cfg, face)


def _check_memory(loaded: LoadedModel, cfg: QuantizeConfig, face: str, copies: int):
    from .config import SETTINGS
    spec = method_spec(cfg.method)
    device = resolve_device(cfg.device)
    streamed = is_streamed(loaded.model)
    est = estimate(cfg, loaded.model, copies=0 if streamed else copies, attention_aware=spec.attention_aware,
                   fp_stream=spec.fp_stream, on_cuda=device.type == "cuda", streamed=streamed)
    names = ", ".join(SETTINGS[n].who(face) for n in ("calib_samples", "seqlen", "batch_size"))
    check_fits(est, device, f"lower {names}" + ("" if streamed else f", or set {SETTINGS['offload'].who(face)} disk"))


def _check_seqlen(loaded: LoadedModel, seqlen: int, face: str):
    """Windows longer than the model's positions, or than a sliding window the workbench's full causal
    attention would not apply, would calibrate and evaluate on what the model never computes."""
    from .config import SETTINGS
    who, config = SETTINGS["seqlen"].who(face), loaded.model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise WorkbenchError(f"{who} {seqlen} is longer than the model's {limit} positions "
                             f"(max_position_embeddings); use {who} {limit} or less")
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and window and seqlen > window:
        raise WorkbenchError(f"{who} {seqlen} is longer than the model's sliding window of {window} tokens, which "
                             f"the workbench's full attention does not apply; use {who} {window} or less")


def _check_group_size(loaded: LoadedModel, grid: GridConfig):
    """Refuse, before any work, a group size that does not divide some layer's input width."""
    block = loaded.family.blocks(loaded.model)[0]
    for kind in loaded.family.linears:
        grid.group_width(loaded.family.linear(block, kind).in_features)


def _check_ignore(loaded: LoadedModel, patterns: tuple[str, ...]):
    """Refuse, before any work, an ``ignore`` pattern that matches no linear layer (a typo would
    otherwise quantize what was meant to stay in full precision)."""
    family = loaded.family
    names = [family.layer_name(b, k) for b in range(len(family.blocks(loaded.model))) for k in family.linears]
    for p in patterns:
        if not any(matches(n, (p,)) for n in names):
            raise WorkbenchError(f"--ignore pattern {p!r} matches no linear layer of the model; names look like "
                                 f"{names[0]} (globs such as *.down_proj and re:REGEX work too)")
