"""A run's widths: what its settings ask for (checked before any work), then the plan (measured and
allocated when a budget is given).

Widths come from one source, then ``--keep-bits`` on top: ``--bits`` for every layer, a plan file,
or a budget (``--avg-bits`` / ``--max-size``) allocated on the layers' measured costs, the
overridden layers counted in the budget at their fixed widths.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ..distributed import SINGLE, Ranks
from ..engine import Event
from ..errors import WorkbenchError
from ..progress import phase_progress
from .allocate import allocate
from .overrides import apply_overrides, parse_override
from .plan import BUDGET_WIDTHS, Layer, Plan, check_plan, measure_plan, read_plan, run_layers
from .sensitivity import FISHER, OBJECTIVE, fisher_costs, objective_costs, row_errors
from .sizes import MB, average_bits, packed_bytes


@dataclass(frozen=True)
class Request:
    """What the settings ask for, checked against the model."""
    layers: list[Layer]
    fixed: dict[str, int]          # widths given (every layer's, without a budget)
    budget: int | None             # bytes the allocated plan may take (None: no allocation)
    given: dict                    # the budget as given, for the report


def widths_of(cfg) -> tuple[int, ...]:
    """Every width the run may quantize to, from its settings alone (what the export must be able to pack)."""
    if cfg.has_budget:
        found = set(cfg.candidates())
    elif cfg.plan is not None:
        found = set(read_plan(cfg.plan).values())
    else:
        found = {cfg.bits}
    return tuple(sorted(found | {parse_override(item).bits for item in cfg.keep_bits}))


def request_of(model, family, cfg, face: str = "api") -> Request | None:
    """The widths ``cfg`` asks for on this model; None for a uniform run. Raises ``WorkbenchError`` naming
    the setting for a plan or an override the model cannot take, and for a budget below the smallest plan."""
    if not cfg.mixed:
        return None
    from ..config import SETTINGS
    who = lambda name: SETTINGS[name].who(face)  # noqa: E731
    layers = run_layers(model, family, cfg.max_blocks, cfg.ignore)
    if not layers:
        raise WorkbenchError(f"the run quantizes no layers ({who('ignore')} leaves every one in full precision), so "
                             f"there are no widths to choose")
    n_blocks = len(family.blocks(model))
    bits: dict[str, int] = {}
    if cfg.plan is not None:
        bits = read_plan(cfg.plan)
        every = [family.layer_name(b, k) for b in range(n_blocks) for k in family.linears]
        check_plan(bits, layers, every, f"{who('plan')} {cfg.plan!r}")
    elif not cfg.has_budget:
        bits = {l.name: cfg.bits for l in layers}
    overrides = [parse_override(item) for item in cfg.keep_bits]
    fixed = {**bits, **apply_overrides(overrides, family, n_blocks, {l.name for l in layers}, who("keep_bits"),
                                       f"{who('ignore')}, {who('max_blocks')}")}
    if not cfg.has_budget:
        return Request(layers, fixed, None, {})
    weights = sum(l.weights for l in layers)
    if cfg.avg_bits is not None:
        budget, given = math.floor(cfg.avg_bits * weights / 8), {"avg_bits": cfg.avg_bits}
    else:
        budget, given = math.floor(cfg.max_size * MB), {"max_size_mb": cfg.max_size}
    request = Request(layers, fixed, budget, given)
    smallest = sum(_size(l, request.fixed.get(l.name, min(cfg.candidates())), cfg) for l in layers)
    if smallest > budget:
        name = "avg_bits" if cfg.avg_bits is not None else "max_size"
        # rounded up, so that the value the message offers is enough
        least = _up(average_bits(smallest, weights), 4) if name == "avg_bits" else _up(smallest / MB, 6)
        pinned = f", the layers of {who('keep_bits')} at theirs," if fixed else ""
        raise WorkbenchError(f"{who(name)} {getattr(cfg, name)} is below the smallest plan: every layer at "
                             f"{min(cfg.candidates())} bits{pinned} takes "
                             f"{average_bits(smallest, weights):.4f} bits per weight, {smallest / MB:.6f} MB; give "
                             f"{who(name)} {least} or more")
    return request


def _up(value: float, places: int) -> str:
    return f"{math.ceil(value * 10 ** places) / 10 ** places:.{places}f}"


def _size(layer: Layer, bits: int, cfg) -> int:
    return packed_bytes(layer.d_out, layer.d_in, bits, cfg.group_size, cfg.symmetric)


def tied_items(layers: list[Layer], family, split: bool) -> list[list[Layer]]:
    """The allocation's items: the layers of a fused set of a block take one width together (unless
    ``split``), every other layer its own."""
    if split:
        return [[l] for l in layers]
    fused_of = {k: kinds for kinds in family.fused for k in kinds}
    items: dict[tuple, list[Layer]] = {}
    for l in layers:
        items.setdefault((l.block, fused_of.get(l.kind, (l.kind,))), []).append(l)
    return list(items.values())


def allocation_widths(cfg, layers: list[Layer], room: int) -> tuple[int, ...]:
    """The widths a budget chooses from: the given candidates, or else the two of ``BUDGET_WIDTHS`` whose
    uniform plans of ``layers`` lie either side of ``room`` bytes (one if a uniform plan fits it exactly
    or none is above it).

    Only neighbours by default, because the costs add up second-order estimates of each layer's error
    alone: measured on GPTQ at 3.5 bits, plans of 3 and 4 bits beat plans that may also take 2 and 8
    (README, "Mixed precision"); the far widths trade a layer's large error for another's small one, where
    the estimates are least right.
    """
    if cfg.candidate_bits:
        return cfg.candidates()
    sizes = {b: sum(_size(l, b, cfg) for l in layers) for b in BUDGET_WIDTHS}
    below = [b for b in BUDGET_WIDTHS if sizes[b] <= room] or [BUDGET_WIDTHS[0]]
    above = [b for b in BUDGET_WIDTHS if sizes[b] >= room] or [BUDGET_WIDTHS[-1]]
    return tuple(sorted({max(below), min(above)}))


def measure_costs(model, family, layers: list[Layer], ids, cfg, device, signals=(FISHER,), ranks: Ranks = SINGLE,
                  on_event=None, cancel=None, widths: tuple[int, ...] | None = None
                  ) -> dict[str, dict[str, dict[int, float]]]:
    """Signal -> layer -> width -> cost, for ``widths`` (default: every width of ``cfg.candidates()``) on the
    run's grid (``ids``: calibration windows, of which ``fisher`` takes the first
    ``cfg.sensitivity_samples``; the model in full precision, on the CPU, where it is left)."""
    widths = widths or cfg.candidates()
    out = {}
    if OBJECTIVE in signals:
        errors = row_errors(model, family, layers, ids, cfg.grid(), widths, device, cfg.batch_size, ranks,
                            cancel, phase_progress(on_event, "sensitivity: layer errors", "block"))
        out[OBJECTIVE] = objective_costs(errors)
    if FISHER in signals:
        out[FISHER] = fisher_costs(model, layers, ids[:cfg.sensitivity_samples], cfg.grid(), widths, device,
                                   cfg.batch_size, ranks, cancel,
                                   phase_progress(on_event, "sensitivity: loss gradients", "batch"),
                                   phase_progress(on_event, "sensitivity: candidate grids", "layer"))
    return {s: out[s] for s in signals}


def make_plan(request: Request, model, family, ids, cfg, device, ranks: Ranks = SINGLE, on_event=None,
              cancel=None, costs: dict[str, dict[int, float]] | None = None) -> tuple[Plan, dict[str, float]]:
    """The plan of the run, and the seconds its sensitivity measurement and allocation took.

    ``costs`` (layer -> width -> cost under ``cfg.sensitivity``, for every layer the budget chooses a width
    for) are costs measured before on the same model, calibration and grid: the budget is then allocated
    on them without measuring again (the app's Plan panel re-plans that way for each budget or override)."""
    base = {"source": "budget" if request.budget is not None else ("plan" if cfg.plan else "keep-bits"),
            "group_size": cfg.group_size, "symmetric": cfg.symmetric, "keep_bits": list(cfg.keep_bits)}
    if request.budget is None:
        bits = dict(request.fixed)
        return Plan(bits, {**base, **measure_plan(bits, request.layers, cfg.group_size, cfg.symmetric),
                           "layers": bits}), {}
    free = [l for l in request.layers if l.name not in request.fixed]
    room = request.budget - sum(_size(l, b, cfg) for l in request.layers if (b := request.fixed.get(l.name)))
    candidates = allocation_widths(cfg, free, room)
    t0 = time.perf_counter()
    known, costs = costs, {}
    if known is not None:
        costs = {l.name: known[l.name] for l in free}
    elif free:
        if on_event is not None:
            on_event(Event("phase", message=f"sensitivity ({cfg.sensitivity}) of {len(free)} layers at "
                                            f"{', '.join(map(str, candidates))} bits"))
        costs = measure_costs(model, family, free, ids, cfg, device, (cfg.sensitivity,), ranks, on_event,
                              cancel, candidates)[cfg.sensitivity]
    t1 = time.perf_counter()
    items = tied_items(free, family, cfg.split_fused)
    # within budget: request_of refused a budget below the smallest plan before any work
    found = allocate([[sum(costs[l.name][b] for l in item) for b in candidates] for item in items],
                     [[sum(_size(l, b, cfg) for l in item) for b in candidates] for item in items], room)
    # the same plan on every rank, whatever float noise their sums picked up
    picks = ranks.broadcast(found.picks, 0)
    bits = dict(request.fixed)
    bits.update({l.name: candidates[j] for item, j in zip(items, picks) for l in item})
    t2 = time.perf_counter()
    bits = {l.name: bits[l.name] for l in request.layers}       # in the run's order
    record = {**base, "budget": request.given, "budget_bytes": request.budget, "sensitivity": cfg.sensitivity,
              "candidates": list(candidates), "candidates_given": bool(cfg.candidate_bits), "split_fused": cfg.split_fused, "exact": found.exact,
              "predicted_cost": found.cost, **measure_plan(bits, request.layers, cfg.group_size, cfg.symmetric),
              "costs": {n: {str(b): c for b, c in by_bits.items()} for n, by_bits in costs.items()}, "layers": bits}
    return Plan(bits, record), {"sensitivity": t1 - t0, "allocation": t2 - t1}
