"""A mixed-precision plan made before its run: the app's Plan panel and the notebooks' ``PlanWidget``.

``make_draft`` measures every layer's cost at each candidate width once, on the cached full-precision
model, and spends the budget through ``mixed.setup.make_plan`` (the run's own allocation, width
overrides pinned and counted in the budget). Called again with another budget or other overrides on
the same model, calibration and grid it allocates on the costs already measured, at once: moving the
budget or pinning a layer re-plans without a pass through the model. ``Draft.run_config`` writes the
plan as a file (as ``--plan-out`` does) and gives the config that quantizes with it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .api import check_against_model, conversion_progress
from .config import DEFAULTS, SETTINGS, QuantizeConfig
from .data import calibration_windows
from .devices import resolve_device
from .errors import WorkbenchError
from .figures.plan import COST_PREFIX
from .figures.style import method_label
from .mixed.plan import Layer, Plan, write_plan
from .mixed.sensitivity import FISHER
from .mixed.setup import make_plan, measure_costs
from .mixed.sizes import MB
from .workspace import MODELS, SLOTS, ModelCache, holding

# what the measured costs depend on, besides the grid and the candidate widths
COST_SETTINGS = ("model", "calib", "calib_samples", "seqlen", "seed", "max_blocks", "ignore", "sensitivity",
                 "sensitivity_samples", "device", "batch_size")
# what decides the layers a plan names and the bytes its budget counts: a plan runs where these agree
LAYOUT_SETTINGS = ("model", "max_blocks", "ignore", "group_size", "symmetric")


def costs_key(cfg: QuantizeConfig) -> tuple:
    return tuple(getattr(cfg, n) for n in COST_SETTINGS) + (cfg.grid(), cfg.candidates())


@dataclass(frozen=True)
class Draft:
    config: QuantizeConfig                  # the settings it was made with: budget, candidates, overrides
    layers: tuple[Layer, ...]
    kinds: tuple[str, ...]                  # the model's layer kinds, in its order
    costs: dict                             # layer -> width -> cost under ``config.sensitivity``, every layer
    plan: Plan
    pinned: frozenset[str]                  # layers the overrides fixed
    seconds: float                          # of the sensitivity measurement (0: the costs were reused)

    @property
    def bits(self) -> dict[str, int]:
        return self.plan.bits

    def predicted(self) -> tuple[float, int]:
        """The summed cost of the layers at their widths, and how many layers sit at a width that was not
        measured (pinned outside the candidates) and so are left out of it."""
        known = [self.costs[n].get(b) for n, b in self.bits.items()]
        return float(sum(c for c in known if c is not None)), sum(c is None for c in known)

    def predicted_change_pct(self) -> float | None:
        """The perplexity change the costs predict, in %: ``fisher`` costs are each layer's rise of the mean
        token loss (nats), so their sum is a log perplexity ratio; ``objective`` costs are relative errors
        and predict no perplexity (None)."""
        if self.config.sensitivity != FISHER:
            return None
        return 100 * (math.exp(self.predicted()[0]) - 1)

    def table(self) -> pd.DataFrame:
        """One row per layer: name, block, kind, bits, cost at its width, pinned, ``cost_<b>`` per candidate."""
        candidates = self.config.candidates()
        rows = []
        for layer in self.layers:
            by_bits = self.costs[layer.name]
            bits = self.bits[layer.name]
            rows.append({"name": layer.name, "block": layer.block, "kind": layer.kind, "bits": bits,
                         "cost": by_bits.get(bits, math.nan), "pinned": layer.name in self.pinned,
                         **{f"{COST_PREFIX}{b}": by_bits.get(b, math.nan) for b in candidates}})
        return pd.DataFrame(rows)

    def summary(self) -> dict:
        record = self.plan.record
        cost, unpriced = self.predicted()
        return {"avg_bits": record["avg_bits"], "size_mb": record["size_bytes"] / MB,
                "budget_avg_bits": self.config.avg_bits, "budget_mb": self.config.max_size,
                "predicted_cost": cost, "unpriced": unpriced, "ppl_change_pct": self.predicted_change_pct(),
                "layer_counts": record["layer_counts"], "pinned": len(self.pinned)}

    def layout_problem(self, cfg: QuantizeConfig, face: str = "api") -> str | None:
        """Why this plan cannot run with ``cfg`` (other layers or other sizes than it was made for), or None."""
        changed = [n for n in LAYOUT_SETTINGS if getattr(cfg, n) != getattr(self.config, n)]
        if not changed:
            return None
        shown = ", ".join(f"{SETTINGS[n].who(face)} {_shown(n, getattr(self.config, n))} (now "
                          f"{_shown(n, getattr(cfg, n))})" for n in changed)
        return f"the plan was made for {shown}; make the plan again for these settings, or set them back"

    def write(self, directory) -> Path:
        """The plan file in ``directory``, named after its widths: a plan already written is the same file,
        so a run of it is the same config (and a cached run of it is the same run)."""
        digest = hashlib.sha1(json.dumps(self.bits, sort_keys=True).encode()).hexdigest()[:12]
        path = Path(directory) / f"plan-{digest}.json"
        if not path.exists():
            Path(directory).mkdir(parents=True, exist_ok=True)
            write_plan(path, self.plan)
        return path

    def run_config(self, cfg: QuantizeConfig, directory, face: str = "api") -> QuantizeConfig:
        """``cfg`` (a run's settings for its method) quantizing with this plan, written to ``directory``.
        The plan gives every width: ``cfg``'s bits, budget and overrides are replaced."""
        problem = self.layout_problem(cfg, face)
        if problem:
            raise WorkbenchError(problem)
        path = self.write(directory)
        return dataclasses.replace(cfg, bits=DEFAULTS["bits"], avg_bits=None, max_size=None, keep_bits=(),
                                   sensitivity=DEFAULTS["sensitivity"],
                                   sensitivity_samples=DEFAULTS["sensitivity_samples"],
                                   candidate_bits=DEFAULTS["candidate_bits"], split_fused=DEFAULTS["split_fused"],
                                   plan=str(path)).validate(face)


def describe(draft: Draft, report=None) -> list[tuple[str, str]]:
    """The plan beside its budget, the perplexity change its costs predict and, given the ``report`` of its
    run, the measured one: (heading, sentence) pairs, which the app and the widget each set in their way."""
    s, cfg = draft.summary(), draft.config
    budget = f"{cfg.avg_bits:.2f}" if cfg.avg_bits is not None else f"{cfg.max_size} MB"
    counts = ", ".join(f"{n} at {b}" for b, n in s["layer_counts"].items())
    pinned = f", {s['pinned']} pinned" if s["pinned"] else ""
    out = [("Plan", f"{s['avg_bits']:.3f} bits per weight for a budget of {budget}, {s['size_mb']:.4f} MB of "
                    f"quantized layers; layers {counts} bits{pinned}.")]
    left_out = (f"; {s['unpriced']} layers pinned at a width that was not measured are left out"
                if s["unpriced"] else "")
    if s["ppl_change_pct"] is not None:
        out.append(("Predicted", f"perplexity {s['ppl_change_pct']:+.2f}% (the layers' fisher costs add up to "
                                 f"{s['predicted_cost']:.4f} nats of mean token loss{left_out})."))
    else:
        out.append(("Predicted", f"cost {s['predicted_cost']:.4g} (objective costs are relative output errors "
                                 f"and predict no perplexity; choose fisher for a prediction{left_out})."))
    if report is not None and report.ppl_fp and report.ppl_quant:
        out.append((f"Measured with {method_label(report.method)}",
                    f"perplexity {report.ppl_fp:.3f} -> {report.ppl_quant:.3f} "
                    f"({100 * (report.ppl_quant / report.ppl_fp - 1):+.2f}%), {report.plan['avg_bits']:.3f} bits "
                    f"per weight as run."))
    elif report is not None:
        out.append(("Measured", f"perplexity was skipped ({SETTINGS['eval_windows'].label} = -1)."))
    else:
        out.append(("Measured", "press Run with this plan."))
    return out


def pin_item(overrides: str, layer: str | None, bits) -> str:
    """The width overrides (comma-separated) with ``layer`` (``KIND@BLOCK``) pinned at ``bits``; an earlier
    pin of the same layer is replaced rather than kept beside it."""
    if not layer:
        raise WorkbenchError("choose the layer to pin (the menu fills in once a plan is made), then its bits")
    items = [i.strip() for i in (overrides or "").split(",") if i.strip() and not i.strip().startswith(layer + ":")]
    return ", ".join([*items, f"{layer}:{bits}"])


def _shown(name: str, value) -> str:
    if value is None:
        return SETTINGS[name].none_means
    if isinstance(value, tuple):
        return ", ".join(value) or "none"
    return str(value)


def _say(on_event, message: str):
    from .engine import Event
    if on_event is not None:
        on_event(Event("phase", message=message))


def make_draft(cfg: QuantizeConfig, *, models: ModelCache = MODELS, known: Draft | None = None, on_event=None,
               cancel=None, face: str = "api") -> Draft:
    """The plan ``cfg``'s budget gives on the cached model (``cfg`` validated for ``face``, whose words the
    errors use). ``known``: an earlier draft, whose costs are reused when they were measured on the same
    model, calibration, grid and candidates. Stops with ``Cancelled`` once ``cancel`` is set."""
    cfg = cfg.validate(face)
    if not cfg.has_budget:
        raise WorkbenchError(f"a plan spends a size budget: give {SETTINGS['avg_bits'].who(face)} or "
                             f"{SETTINGS['max_size'].who(face)}")
    with SLOTS.held(cancel, on_event, "plan"):
        _say(on_event, f"loading {cfg.model}")
        shared = models.get(cfg.model, cancel, conversion_progress(on_event, cfg.model))
        request = check_against_model(shared.loaded, cfg, face)
        family, model = shared.loaded.family, shared.loaded.model
        device = resolve_device(cfg.device)
        reuse = known is not None and costs_key(known.config) == costs_key(cfg)
        costs, seconds = (known.costs if reuse else None), 0.0
        if costs is None:
            t0 = time.perf_counter()
            ids = calibration_windows(shared.tokenizer, cfg.calib, cfg.calib_samples, cfg.seqlen, cfg.seed)
            _say(on_event, f"sensitivity ({cfg.sensitivity}) of {len(request.layers)} layers")
            # every layer, pinned ones too: a later override or budget allocates on these without measuring
            with holding(shared.lock, cancel):
                costs = measure_costs(model, family, request.layers, ids, cfg, device, (cfg.sensitivity,),
                                      on_event=on_event, cancel=cancel)[cfg.sensitivity]
            seconds = time.perf_counter() - t0
        plan, _ = make_plan(request, model, family, None, cfg, device, costs=costs)
    return Draft(cfg, tuple(request.layers), tuple(family.linears), costs, plan, frozenset(request.fixed), seconds)
