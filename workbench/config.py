"""``QuantizeConfig``: every setting of a quantization run, declared once (see ``workbench.settings``).

To add a setting: declare it here with ``setting(...)``, then use it where it acts. The command
line, the app, the widgets and the validation pick it up from the declaration.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


from .attention_hessians import VALUE_OUTPUTS
from .data import DEFAULT_CALIB, DEFAULT_EVAL
from .devices import availability_problem, device_problem
from .errors import WorkbenchError
from .methods import INITS, METHODS, LearnedOptions, ScaleTuning, method_spec
from .mixed.overrides import BITS_RANGE, overrides_problem
from .mixed.plan import BUDGET_WIDTHS, plan_file_problem
from .mixed.sensitivity import FISHER, SIGNALS
from .models.loading import DEFAULT_MODEL, EMBEDDED
from .offload import DISK, OFFLOADS
from .patterns import pattern_problem
from .quant.activation import BITS as ACT_BITS
from .quant.activation import OFF as ACT_OFF
from .quant.activation import ActivationGrid
from .quant.grid import SEARCHES, GridConfig
from .quant.lattice import LATTICES, lattice
from .quant.solver import SolverConfig
from .rotate import KINDS as ROTATIONS
from .settings import Setting, defaults_of, setting, settings_of

_LEARNED = LearnedOptions()
_TUNING = ScaleTuning()
SOLVERS = tuple(m for m, spec in METHODS.items() if spec.solver is not None)   # the column-loop solver runs
ATTENTION = tuple(m for m, spec in METHODS.items() if spec.attention_aware)   # attention-aware q/k/v factors
TUNED = tuple(m for m, spec in METHODS.items() if spec.tunes_scales)          # block-wise scale tuning
SEED_MAX = 2 ** 32 - 1     # what every generator seeded from it (torch, numpy) accepts
STAGE_WISE = tuple(m for m, spec in METHODS.items() if spec.layer is not None)
GGUF_PREFIX = "gguf:"
FORMATS = ("pack-quantized", "fake-quant") + tuple(GGUF_PREFIX + t for t in LATTICES)
INTEGER_ZERO = ("aespa", "brecq")    # learned rounding keeps an integer zero point: no stored minimums
# the mixed-precision settings are not fields of the forms: the app's Plan panel (ui.plan_panel) and the
# PlanWidget make their own from these declarations, and write the plan file themselves (a plan is a file
# path, which a public app must not read from a visitor: see ui.exposure)
MIXED_FACES = ("cli", "api")


def _group_problem(value: int) -> str | None:
    if value == -1 or value >= 1:
        return None
    return f"must be -1 (one grid per output channel) or a positive width, got {value}"


def _candidates_problem(value: tuple[str, ...]) -> str | None:
    low, high = BITS_RANGE
    bad = [v for v in value if not v.isdigit() or not low <= int(v) <= high]
    if bad:
        return f"has widths outside {low}-{high} ({', '.join(map(repr, bad))}); give whole numbers from {low} to " \
               f"{high}, comma-separated"
    return None


def _size_problem(value: float) -> str | None:
    return None if value > 0 else f"must be more than 0 MB, got {value}"


_FP_STREAM = tuple(m for m, spec in METHODS.items() if spec.fp_stream)


def _shared_default(field_name: str, methods: tuple[str, ...]):
    """The one default of a solver option across ``methods`` (a form field that cannot be empty shows it)."""
    found = {getattr(METHODS[m].solver, field_name) for m in methods}
    if len(found) != 1:
        raise ValueError(f"{field_name} has defaults {sorted(found)} across {methods}; a form field can show one")
    return found.pop()


def _defaults(field_name: str, methods: tuple[str, ...]) -> str:
    """The defaults of a solver option for the methods it applies to, for help texts."""
    found = [f"{m} {getattr(METHODS[m].solver, field_name)}" for m in methods]
    return "default per method: " + ", ".join(found)


@dataclass(frozen=True)
class QuantizeConfig:
    # -- model and data
    model: str = setting(DEFAULT_MODEL, str, "Model", "smollm2-135m (embedded), a checkpoint directory, or a hub id",
                         suggestions=tuple(EMBEDDED), group="model")
    method: str = setting("gptq", str, "Method", "the quantization method", choices=tuple(METHODS), group="model",
                          faces=("cli", "api", "widgets"))
    calib: str = setting(DEFAULT_CALIB, str, "Calibration text",
                         "wikitext2, a text file, or hf:NAME[:CONFIG[:SPLIT[:FIELD]]]", suggestions=(DEFAULT_CALIB,),
                         group="data")
    calib_samples: int = setting(32, int, "Calibration samples", "calibration windows drawn", low=1, high=4096,
                                 group="data")
    seqlen: int = setting(512, int, "Sequence length", "tokens per window", low=2, high=32768, group="data")
    eval_text: str = setting(DEFAULT_EVAL, str, "Evaluation text", "text for perplexity: wikitext2-test (the WikiText-2 "
                             "raw test split), a text file, or hf:NAME[:CONFIG[:SPLIT[:FIELD]]]",
                             suggestions=(DEFAULT_EVAL,), group="run")
    eval_windows: int = setting(40, int, "Evaluation windows", "perplexity windows: 0 = all, -1 = skip evaluation",
                                low=-1, high=100000, group="data")
    seed: int = setting(0, int, "Seed", "seed of the calibration offsets", low=0, high=SEED_MAX, group="run")
    # -- the grid
    bits: int = setting(4, int, "Bits", "weight bits, 2-8", low=2, high=8, slider=True, step=1, group="grid")
    group_size: int = setting(64, int, "Group size", "input columns per grid; -1 = one grid per output channel",
                              suggestions=(-1, 32, 64, 192), check=_group_problem, group="grid")
    symmetric: bool = setting(False, bool, "Symmetric", "symmetric grid (zero point in the middle)", group="grid")
    format: str = setting("pack-quantized", str, "Format", "what --save writes and the grid it quantizes to: "
                          "pack-quantized (compressed-tensors, transformers/vLLM), fake-quant (float16), or gguf:TYPE "
                          "(one llama.cpp file; the grids are TYPE's exact lattice, bits, group size and symmetry "
                          "follow from it)", choices=FORMATS, group="grid")
    grid_search: str | None = setting(None, str, "Grid search", "range search of the grids", choices=SEARCHES,
                                      optional=True, none_means="mse for the solvers, minmax for rtn", group="grid")
    max_blocks: int | None = setting(None, int, "Max blocks", "quantize only the first N blocks (0 or empty: all)",
                                     low=1, optional=True, none_means="all blocks", form_none=0, group="grid")
    ignore: tuple[str, ...] = setting((), tuple, "Keep in full precision", "linear layers left unquantized: module "
                                      "names, globs (*.down_proj, model.layers.0.*) or re:REGEX, comma-separated",
                                      check=pattern_problem, group="run")
    # -- mixed precision: a width per layer, from a size budget, a plan file or overrides
    avg_bits: float | None = setting(None, float, "Average bits", "size budget in bits per weight of the quantized "
                                     "linears as pack-quantized stores them, float16 scales and packed zero points "
                                     "included (uniform 4-bit g64 asymmetric takes 4.31): each layer gets the "
                                     "candidate width that costs the model least by its measured sensitivity",
                                     low=2.0, high=16.0, optional=True, none_means="no budget: --bits for every layer",
                                     slider=True, step=0.05, group="mixed", faces=MIXED_FACES, metavar="B")
    max_size: float | None = setting(None, float, "Size budget (MB)", "size budget in MB (10^6 bytes) of the "
                                     "quantized linears as pack-quantized stores them (codes, float16 scales, zero "
                                     "points; the embeddings, norms, lm_head and layers left in full precision not "
                                     "counted), allocated as with --avg-bits", optional=True, check=_size_problem,
                                     none_means="no budget: --bits for every layer", group="mixed", faces=MIXED_FACES,
                                     metavar="MB")
    sensitivity: str = setting(FISHER, str, "Sensitivity", "what a budget weighs a layer's error of fewer bits by: "
                               "fisher (its output error times the squared loss gradient at its output, token by "
                               "token, from one backward pass of the model) or objective (its relative output error, every layer "
                               "alike)", choices=SIGNALS, group="mixed", faces=MIXED_FACES)
    sensitivity_samples: int = setting(8, int, "Sensitivity windows", "calibration windows the fisher "
                                       "sensitivity is measured on (the first N of them, all if there are fewer): one "
                                       "forward and backward pass of the model over them", low=1, high=4096, group="mixed",
                                       faces=MIXED_FACES, metavar="N")
    candidate_bits: tuple[str, ...] = setting((), tuple, "Candidate bits", "the widths a budget chooses from, "
                                              "comma-separated; empty: the two of 2, 3, 4 and 8 whose uniform "
                                              "sizes lie either side of the budget (measured better than all "
                                              "four: README, Mixed precision)", check=_candidates_problem,
                                              group="mixed", faces=MIXED_FACES, metavar="BITS")
    split_fused: bool = setting(False, bool, "Split fused layers", "let a budget give q/k/v, and gate/up, of a block "
                                "different widths (vLLM fuses each set into one matmul and serves one scheme per "
                                "fused layer, so it cannot load such a checkpoint)", group="mixed", faces=MIXED_FACES)
    plan: str | None = setting(None, str, "Plan file", "quantize each layer at the width a JSON plan gives it (what "
                               "--plan-out writes, or {\"layers\": {NAME: BITS}} by hand); it must name every "
                               "layer the run quantizes", optional=True, none_means="none", check=plan_file_problem,
                               group="mixed", faces=MIXED_FACES, metavar="FILE")
    keep_bits: tuple[str, ...] = setting((), tuple, "Width overrides", "fixed widths, KIND[@BLOCKS]:BITS comma-"
                                         "separated: q:8 (every q_proj), down@0-2:4 (down_proj of blocks 0 to 2), "
                                         "attn:4 or mlp:3 (all of a half of the block); on top of the bits or a plan, "
                                         "and counted in a budget; later items win", check=overrides_problem,
                                         group="mixed", faces=MIXED_FACES, metavar="KIND[@BLOCKS]:BITS")
    # -- activations: quantized per token at run time, and the rotation that makes them quantizable
    act_bits: int = setting(ACT_OFF, int, "Activation bits", "bits of every quantized layer's input, per token and "
                            f"dynamic ({ACT_OFF} = not quantized)", choices=ACT_BITS, group="activations")
    act_symmetric: bool = setting(False, bool, "Symmetric activations", "symmetric per-token activation grid "
                                  "(zero in the middle) instead of min/max", group="activations")
    act_clip: float | None = setting(None, float, "Activation clip", "fraction of each token's range the activation "
                                     "grid spans, 0.05-1", low=0.05, high=1.0, optional=True,
                                     none_means="searched per layer on the calibration inputs", group="activations")
    kv_bits: int = setting(ACT_OFF, int, "KV-cache bits", "bits of the keys and values, per head and token "
                           f"({ACT_OFF} = not quantized)", choices=ACT_BITS, group="activations")
    rotate: str = setting("none", str, "Rotation", "rotate the residual stream (fused into the weights) and the "
                          "inputs of o_proj and down_proj (online) so activations lose their outlier channels: "
                          "hadamard, random (seeded orthogonal) or none", choices=ROTATIONS, group="activations")
    # -- where and how it runs
    device: str = setting("auto", str, "Device", "auto, cpu, cuda or cuda:N", suggestions=("auto", "cpu", "cuda"),
                          check=device_problem, group="grid")
    batch_size: int = setting(4, int, "Batch size", "sequences per forward chunk", low=1, high=1024, group="run")
    offload: str = setting("none", str, "Offload", "where the model's blocks live: none (in memory), disk (read from "
                           "the checkpoint one block at a time and exported as they are done, for models larger "
                           "than memory), auto (disk when the in-memory run would not fit)", choices=OFFLOADS,
                           group="run")
    activation_memory: float | None = setting(None, float, "Activation memory (GB)", "hidden states between blocks "
                                              "kept in memory; beyond this many GB they spill to disk", low=0.0,
                                              optional=True, none_means="no limit", group="run")
    measure_batches: int = setting(2, int, "Measure batches", "calibration batches for the attention error of q/k/v",
                                   low=1, methods=STAGE_WISE, group="run")
    # -- the solver (None: the method's default)
    damp: float | None = setting(None, float, "Damping", "damping, a fraction of the mean Hessian diagonal "
                                 f"({_defaults('damp', SOLVERS)})", low=0.0, high=0.999, optional=True,
                                 methods=SOLVERS, group="solver")
    act_order: bool | None = setting(None, bool, "Act order", "columns by descending Hessian diagonal, static groups "
                                     f"({_defaults('act_order', SOLVERS)})", optional=True, methods=SOLVERS, group="solver")
    block_size: int = setting(128, int, "Lazy block", "columns per lazy-update block", low=1, high=65536,
                              methods=SOLVERS, group="solver")
    rows_per_step: int | None = setting(None, int, "Rows per step", "rows of every head quantized jointly, 1 = BoA "
                                        f"({_defaults('rows_per_step', ATTENTION)})", low=1, high=4096, optional=True,
                                        methods=ATTENTION, group="solver")
    dx_alpha: float | None = setting(None, float, "dx alpha", "strength of the correction for errors inherited from "
                                     f"earlier layers, 0-1 ({_defaults('dx_alpha', _FP_STREAM)})", low=0.0,
                                     high=1.0, optional=True, methods=_FP_STREAM, slider=True, step=0.05,
                                     # a slider cannot be empty: it starts at, and stands for, the default
                                     form_none=_shared_default("dx_alpha", _FP_STREAM), group="solver")
    refine_iters: int | None = setting(None, int, "Refine iterations", "scale-refinement sweeps after rounding "
                                       f"({_defaults('refine_iters', SOLVERS)})", low=0, high=100, optional=True,
                                       methods=SOLVERS, group="solver")
    passes: int | None = setting(None, int, "Passes", "column-loop passes: each after the first solves the codes "
                                 "again on the grids the refinement left and refines those, kept while the layer's "
                                 f"objective falls ({_defaults('passes', SOLVERS)})", low=1, high=20,
                                 optional=True, methods=SOLVERS, group="solver")
    grid_at_start: bool | None = setting(None, bool, "Grid at start", "grids from the initial weights instead of when "
                                         "each row is reached", optional=True, methods=SOLVERS, group="solver")
    value_output: str = setting("identity", str, "Value output factor", "output factor of the value projection's "
                                "Hessian", choices=VALUE_OUTPUTS, methods=ATTENTION, group="solver")
    # -- learned rounding, aespa / brecq (None: the default of LearnedOptions)
    iters: int | None = setting(None, int, "Rounding steps", "Adam steps per layer (aespa) or per block (brecq); "
                                f"default {_LEARNED.iters}", low=1, high=100000, optional=True,
                                methods=("aespa", "brecq"), group="learned")
    lr: float | None = setting(None, float, "Learning rate", f"Adam on the rounding variables; default {_LEARNED.lr}",
                               low=1e-6, high=10.0, optional=True, methods=("aespa", "brecq"), group="learned")
    tune_steps: int | None = setting(None, int, "Tuning steps", "Adam steps per block on the group scales, one "
                                     f"calibration window each (0 = no tuning); default {_TUNING.steps}", low=0,
                                     high=100000, optional=True, methods=TUNED, group="learned")
    tune_lr: float | None = setting(None, float, "Tuning rate", "Adam's learning rate on the log of each group "
                                    f"scale; default {_TUNING.lr}", low=1e-6, high=1.0, optional=True,
                                    methods=TUNED, group="learned")
    tune_norms: bool | None = setting(None, bool, "Tune norms", "also tune the block's norm weights (kept in full "
                                      f"precision) with its scales; default {'on' if _TUNING.norms else 'off'}",
                                      optional=True, methods=TUNED, group="learned")
    e2e_steps: int | None = setting(None, int, "End-to-end steps", "then Adam steps on every group scale of the model "
                                    "at once, on its next-token loss over one calibration window each (0 = none); "
                                    f"default {_TUNING.e2e_steps}", low=0, high=100000, optional=True, methods=TUNED,
                                    group="learned")
    e2e_lr: float | None = setting(None, float, "End-to-end rate", "Adam's learning rate of the end-to-end steps on "
                                   f"the log of each group scale; default {_TUNING.e2e_lr}", low=1e-6, high=1.0,
                                   optional=True, methods=TUNED, group="learned")
    init: str | None = setting(None, str, "Start from", f"aespa's starting rounding; default {_LEARNED.init}",
                               choices=INITS, optional=True, methods=("aespa",), group="learned")

    @property
    def gguf_type(self) -> str | None:
        return self.format[len(GGUF_PREFIX):] if self.format.startswith(GGUF_PREFIX) else None

    def grid(self) -> GridConfig:
        search = self.grid_search or method_spec(self.method).grid_search
        if self.gguf_type is not None:
            return GridConfig.for_lattice(self.gguf_type, search)
        return GridConfig(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, search=search)

    def solver(self) -> SolverConfig:
        base = method_spec(self.method).solver or SolverConfig()
        chosen = {k: getattr(self, k) for k in ("damp", "rows_per_step", "dx_alpha", "refine_iters", "passes",
                                                "grid_at_start", "act_order") if getattr(self, k) is not None}
        return dataclasses.replace(base, block_size=self.block_size, **chosen)

    def activations(self) -> ActivationGrid:
        """The per-token grid of the layers' inputs (its clip 1 until searched, when ``act_clip`` is None)."""
        return ActivationGrid(self.act_bits, self.act_symmetric, 1.0 if self.act_clip is None else self.act_clip)

    def kv_cache(self) -> ActivationGrid:
        return ActivationGrid(self.kv_bits)

    @property
    def transforms_activations(self) -> bool:
        """The run changes the model's forward beyond its weights (what the checkpoint formats do not carry)."""
        return self.rotate != "none" or self.act_bits < ACT_OFF or self.kv_bits < ACT_OFF

    @property
    def has_budget(self) -> bool:
        return self.avg_bits is not None or self.max_size is not None

    @property
    def mixed(self) -> bool:
        """Layers may get different widths: a budget, a plan file or width overrides."""
        return self.has_budget or self.plan is not None or bool(self.keep_bits)

    def candidates(self) -> tuple[int, ...]:
        """Every width a budget may give a layer (the allocation takes two of the default ones when none
        are given: ``mixed.setup.allocation_widths``)."""
        return tuple(sorted({int(b) for b in self.candidate_bits})) if self.candidate_bits else BUDGET_WIDTHS

    def tuning(self) -> dict:
        """Options of the block-wise scale tuning that are set."""
        return {k: getattr(self, name) for name, k in (("tune_steps", "steps"), ("tune_lr", "lr"),
                                                       ("tune_norms", "norms"), ("e2e_steps", "e2e_steps"),
                                                       ("e2e_lr", "e2e_lr")) if getattr(self, name) is not None}

    def learned(self) -> dict:
        """Options of the learned-rounding methods that are set."""
        return {k: getattr(self, k) for k in ("iters", "lr", "init") if getattr(self, k) is not None}

    def validate(self, face: str = "api") -> "QuantizeConfig":
        """Every setting through its declaration, then the rules between settings.

        Returns the config with its values as the declarations read them (``"BoA"`` -> ``"boa"``).
        """
        return build_config({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, face)


SETTINGS: dict[str, Setting] = settings_of(QuantizeConfig)
DEFAULTS: dict = defaults_of(QuantizeConfig)

# What the app and the notebooks open with: the first blocks at 3 bits, measured on enough windows to
# rank RTN, GPTQ, BoA and TurboBoA as the whole model at 3 bits does. Two blocks at 4 bits on 8 x 256
# calibration and 4 windows could not: the four lay within 0.2% of each other on 64 windows, and the
# 4 windows' noise reordered them (benchmarks/quick_look.py; the README's "The quick look").
QUICK_LOOK = dict(bits=3, calib_samples=16, seqlen=256, max_blocks=4, eval_windows=16)
# The budget the app's Plan panel and the PlanWidget open on: between the quick look's uniform W3 (3.30 bits
# per weight at g64, as stored) and W4 (4.31), so that a plan has room to give some layers more than 3 bits.
PLAN_START = dict(avg_bits=3.5)


def check_combination(cfg: QuantizeConfig, face: str = "api"):
    """A setting changed from its default for a method it does not apply to is refused, not ignored."""
    for name, s in SETTINGS.items():
        if not s.applies_to(cfg.method) and getattr(cfg, name) != DEFAULTS[name]:
            raise WorkbenchError(f"{s.who(face)} applies to {', '.join(s.methods)}, not {cfg.method}")
    if cfg.act_bits == ACT_OFF:
        for name in ("act_symmetric", "act_clip"):
            if getattr(cfg, name) != DEFAULTS[name]:
                raise WorkbenchError(f"{SETTINGS[name].who(face)} shapes quantized activations; set "
                                     f"{SETTINGS['act_bits'].who(face)} to 4, 6 or 8, or leave it out")
    if cfg.offload == DISK and cfg.transforms_activations:
        raise WorkbenchError(f"{SETTINGS['offload'].who(face)} disk reads one block at a time, and the rotation and "
                             f"activation quantizers are set up on the whole model; use "
                             f"{SETTINGS['offload'].who(face)} none")
    if cfg.offload == DISK and cfg.method in TUNED:
        raise WorkbenchError(f"{SETTINGS['offload'].who(face)} disk reads one block at a time, and {cfg.method} trains "
                             f"the scales of the whole model at once; use {SETTINGS['offload'].who(face)} none or "
                             f"another method")
    if cfg.offload == DISK and cfg.gguf_type is not None:
        raise WorkbenchError(f"{SETTINGS['format'].who(face)} {cfg.format} is written from the whole model in memory; "
                             f"with {SETTINGS['offload'].who(face)} disk save as pack-quantized or fake-quant")
    check_mixed(cfg, face)
    problem = availability_problem(cfg.device)
    if problem:
        raise WorkbenchError(f"{SETTINGS['device'].who(face)} {problem}")


def check_mixed(cfg: QuantizeConfig, face: str):
    """The rules of mixed precision: one source of widths, options only where they act, the formats and
    runs that carry one grid per model refused."""
    who = lambda name: SETTINGS[name].who(face)  # noqa: E731
    if cfg.avg_bits is not None and cfg.max_size is not None:
        raise WorkbenchError(f"{who('avg_bits')} and {who('max_size')} are two budgets; give one of them")
    budget = who("avg_bits") if cfg.avg_bits is not None else who("max_size")
    if cfg.plan is not None and cfg.has_budget:
        raise WorkbenchError(f"{who('plan')} gives every layer its width, and {budget} would choose them; give one "
                             f"of them")
    if (cfg.has_budget or cfg.plan is not None) and cfg.bits != DEFAULTS["bits"]:
        source = budget if cfg.has_budget else who("plan")
        raise WorkbenchError(f"{who('bits')} {cfg.bits} would give every layer one width, and {source} gives each "
                             f"its own; leave {who('bits')} out")
    if not cfg.has_budget:
        for name in ("sensitivity", "sensitivity_samples", "candidate_bits", "split_fused"):
            if getattr(cfg, name) != DEFAULTS[name]:
                raise WorkbenchError(f"{who(name)} shapes how a size budget is spent; give {who('avg_bits')} or "
                                     f"{who('max_size')}, or leave {who(name)} out")
    if not cfg.mixed:
        return
    given = next(who(n) for n in ("avg_bits", "max_size", "plan", "keep_bits") if getattr(cfg, n) not in (None, ()))
    if cfg.gguf_type is not None:
        raise WorkbenchError(f"{who('format')} {cfg.format} stores every layer on the type's one grid, and {given} "
                             f"gives layers different widths; save mixed precision as pack-quantized or fake-quant")
    if cfg.offload == DISK:
        raise WorkbenchError(f"{given} runs with the model in memory; use {who('offload')} none")
    if cfg.has_budget and cfg.transforms_activations:
        raise WorkbenchError(f"{given} measures each layer's sensitivity on the model's own weights and activations, "
                             f"not rotated or quantized ones; leave out {who('rotate')}, {who('act_bits')} and "
                             f"{who('kv_bits')}, or give the widths with {who('plan')} or {who('keep_bits')}")


def build_config(values: dict, face: str) -> QuantizeConfig:
    """The one validation: raw values by field name (missing ones take their defaults) to a checked config."""
    unknown = set(values) - set(SETTINGS)
    if unknown:
        raise WorkbenchError(f"unknown settings: {', '.join(sorted(unknown))}; known: {', '.join(SETTINGS)}")
    parsed = {name: SETTINGS[name].parse(v, face) for name, v in values.items()}
    cfg = QuantizeConfig(**parsed)
    check_combination(cfg, face)
    return on_format_grid(cfg, face)


def on_format_grid(cfg: QuantizeConfig, face: str) -> QuantizeConfig:
    """A GGUF format fixes the grid: bits, group size and symmetry left at their defaults take the
    type's values, others that differ from them are refused."""
    if cfg.gguf_type is None:
        return cfg
    lat = lattice(cfg.gguf_type)
    fmt = SETTINGS["format"].who(face)
    wanted = {"bits": lat.bits, "group_size": lat.sub_block, "symmetric": lat.symmetric}
    for name, value in wanted.items():
        if getattr(cfg, name) not in (value, DEFAULTS[name]):
            raise WorkbenchError(f"{SETTINGS[name].who(face)} {getattr(cfg, name)} does not fit {fmt} {cfg.format}, "
                                 f"which stores {lat.bits}-bit {'symmetric' if lat.symmetric else 'asymmetric'} "
                                 f"groups of {lat.sub_block}; leave {SETTINGS[name].who(face)} out or set it to {value}")
    if lat.min_offset and cfg.method in INTEGER_ZERO:
        fixed = [GGUF_PREFIX + n for n, t in LATTICES.items() if not t.min_offset]
        raise WorkbenchError(f"{cfg.method} rounds on integer zero points, and {cfg.format} stores a float16 minimum "
                             f"instead; choose a type with a fixed zero point ({', '.join(fixed)}) or another method")
    return dataclasses.replace(cfg, **wanted)


def for_method(values: dict, method: str, face: str) -> QuantizeConfig:
    """A form's values as the config of ``method``: settings that do not apply to it keep their
    defaults, so one form serves every method it runs (Compare runs four)."""
    kept = {k: v for k, v in values.items() if SETTINGS[k].applies_to(method)}
    return build_config({**kept, "method": method}, face)
