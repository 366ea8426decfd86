"""A plan: the width of every layer the run quantizes, and the file it is kept in.

``--plan-out`` writes ``{"format": ..., "layers": {name: bits}, ...}`` with what made the plan (the
budget, the sensitivity, the size) beside the widths; ``--plan`` reads the ``layers`` back (a bare
``{name: bits}`` mapping is read too, for plans written by hand). A plan must give a width to every
layer the run quantizes and to no other, so that a typo or a plan of another model is refused
before any work rather than quantizing something else than was meant.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import atomic
from ..errors import WorkbenchError
from ..patterns import matches
from .overrides import BITS_RANGE, bits_problem
from .sizes import average_bits, packed_bytes

PLAN_FORMAT = "workbench-mixed-plan"
SHOWN = 3            # names a message lists before "and N more"
BUDGET_WIDTHS = (2, 3, 4, 8)        # what a budget chooses from when no candidate widths are given


@dataclass(frozen=True)
class Layer:
    """A linear the run quantizes."""
    name: str
    block: int
    kind: str
    d_out: int
    d_in: int

    @property
    def weights(self) -> int:
        return self.d_out * self.d_in


def run_layers(model, family, max_blocks: int | None, ignore: tuple[str, ...]) -> list[Layer]:
    """The linears the run quantizes, in the engine's order (blocks, then the family's kinds)."""
    blocks = family.blocks(model)
    n = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    out = []
    for b in range(n):
        for kind in family.linears:
            name = family.layer_name(b, kind)
            if not matches(name, ignore):
                linear = family.linear(blocks[b], kind)
                out.append(Layer(name, b, kind, linear.out_features, linear.in_features))
    return out


@dataclass
class Plan:
    bits: dict[str, int]                        # layer name -> width
    record: dict = field(default_factory=dict)  # how it was made and what it takes, for the report and the file


def measure_plan(bits: dict[str, int], layers: list[Layer], group_size: int, symmetric: bool) -> dict:
    """The plan's size as the pack-quantized export stores it, its bits per weight and widths used."""
    size = sum(packed_bytes(l.d_out, l.d_in, bits[l.name], group_size, symmetric) for l in layers)
    weights = sum(l.weights for l in layers)
    counts = {str(b): sum(1 for l in layers if bits[l.name] == b) for b in sorted(set(bits.values()))}
    return {"size_bytes": size, "weights": weights, "avg_bits": average_bits(size, weights), "layer_counts": counts}


def shown(names) -> str:
    names = list(names)
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


# -- the file --------------------------------------------------------------------------------------

def plan_file_problem(path: str) -> str | None:
    """The declaration's check of ``--plan``: a readable JSON plan (its layers are checked against the model)."""
    try:
        read_plan(path)
    except WorkbenchError as exc:
        return str(exc)
    return None


def read_plan(path) -> dict[str, int]:
    """The widths of a plan file; raises ``WorkbenchError`` saying what is wrong with it and how to fix it."""
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise WorkbenchError(f"file {str(path)!r} {what}; give a plan written by --plan-out (a JSON file)")
    try:
        raw = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"file {str(path)!r} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise WorkbenchError(f"file {str(path)!r} is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                             f"write it as {{\"layers\": {{\"LAYER NAME\": BITS, ...}}}}") from None
    layers = raw.get("layers", raw) if isinstance(raw, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise WorkbenchError(f"file {str(path)!r} holds no widths; write it as "
                             f"{{\"layers\": {{\"LAYER NAME\": BITS, ...}}}}")
    bad = [f"{n}: {b!r}" for n, b in layers.items() if bits_problem(b)]
    if bad:
        raise WorkbenchError(f"file {str(path)!r} gives widths outside {BITS_RANGE[0]}-{BITS_RANGE[1]} ({shown(bad)}); "
                             f"bits must be whole numbers from {BITS_RANGE[0]} to {BITS_RANGE[1]}")
    return dict(layers)


def check_plan(bits: dict[str, int], layers: list[Layer], all_names: list[str], who: str):
    """Refuse a plan that names layers the model lacks, skips layers the run quantizes, or names layers it
    leaves in full precision."""
    run = [l.name for l in layers]
    unknown = [n for n in bits if n not in set(all_names)]
    if unknown:
        raise WorkbenchError(f"{who} names layers the model does not have ({shown(unknown)}); its names look like "
                             f"{all_names[0]}: was the plan written for another model?")
    missing = [n for n in run if n not in bits]
    if missing:
        raise WorkbenchError(f"{who} gives no width to {len(missing)} layers the run quantizes ({shown(missing)}); "
                             f"add them to the plan, or leave them in full precision with --ignore or --max-blocks")
    idle = [n for n in bits if n not in set(run)]
    if idle:
        raise WorkbenchError(f"{who} gives widths to {len(idle)} layers the run leaves in full precision "
                             f"({shown(idle)}); remove them from the plan, or drop the --ignore or --max-blocks "
                             f"that leaves them out")


def write_plan(path, plan: Plan) -> Path:
    """The plan as a JSON file, whole or not at all."""
    body = {"format": PLAN_FORMAT, **{k: v for k, v in plan.record.items() if k != "layers"}, "layers": plan.bits}
    return atomic.write_atomic(Path(path).expanduser(), json.dumps(body, indent=2) + "\n")
