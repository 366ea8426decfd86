"""``--keep-bits``: fixed widths by layer kind and block range, e.g. ``q:8,down@0-2:4``.

Each item is ``KIND[@BLOCKS]:BITS``: ``KIND`` a kind of the model's linears (``q``, ``k``, ``v``,
``o``, ``gate``, ``up``, ``down``; OPT's ``fc1``, ``fc2``) or ``attn`` / ``mlp`` for all of the
attention's or the MLP's; ``BLOCKS`` one block ``3`` or an inclusive range ``0-2``; later items win.
The syntax is checked by the setting's declaration, the kinds and blocks against the model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import WorkbenchError

ATTN, MLP = "attn", "mlp"
BITS_RANGE = (2, 8)
_ITEM = re.compile(r"^(?P<kind>[A-Za-z_][A-Za-z0-9_]*)(@(?P<first>\d+)(-(?P<last>\d+))?)?:(?P<bits>\S+)$")


@dataclass(frozen=True)
class Override:
    kind: str
    blocks: tuple[int, int] | None     # inclusive; None: every block
    bits: int

    def text(self) -> str:
        if self.blocks is None:
            return f"{self.kind}:{self.bits}"
        first, last = self.blocks
        return f"{self.kind}@{first if first == last else f'{first}-{last}'}:{self.bits}"


def bits_problem(value) -> str | None:
    low, high = BITS_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return f"bits must be whole numbers from {low} to {high}, got {value!r}"
    return None


def parse_override(item: str) -> Override:
    m = _ITEM.match(item.strip())
    if m is None:
        raise WorkbenchError(f"{item!r} is not KIND[@BLOCKS]:BITS (e.g. q:8 or down@0-2:4)")
    try:
        bits = int(m["bits"])
    except ValueError:
        raise WorkbenchError(f"{item!r}: bits must be a whole number from {BITS_RANGE[0]} to {BITS_RANGE[1]}, "
                             f"got {m['bits']!r}") from None
    if bits_problem(bits):
        raise WorkbenchError(f"{item!r}: {bits_problem(bits)}")
    blocks = None
    if m["first"] is not None:
        first = int(m["first"])
        last = first if m["last"] is None else int(m["last"])
        if last < first:
            raise WorkbenchError(f"{item!r}: the block range {first}-{last} is empty; write it low-high")
        blocks = (first, last)
    return Override(m["kind"].lower(), blocks, bits)


def overrides_problem(items: tuple[str, ...]) -> str | None:
    """The declaration's check: the first item that does not parse, with the form it should take."""
    for item in items:
        try:
            parse_override(item)
        except WorkbenchError as exc:
            return f"item {exc}"
    return None


def kind_groups(family) -> dict[str, tuple[str, ...]]:
    """What each ``KIND`` names: the family's kinds, and ``attn`` / ``mlp`` for the two halves of a block."""
    attn = tuple(k for k, path in family.linears.items() if path.startswith(family.attention_path + "."))
    groups = {k: (k,) for k in family.linears}
    groups[ATTN] = attn
    groups[MLP] = tuple(k for k in family.linears if k not in attn)
    return groups


def apply_overrides(overrides: list[Override], family, n_blocks: int, run: set[str],
                    who: str = "--keep-bits", leave_out: str = "--ignore, --max-blocks") -> dict[str, int]:
    """The widths the overrides give to layers of the run (``run``: their names), later items winning.

    An override that names a kind the model lacks, blocks it does not have, or only layers the run
    leaves in full precision is refused: it would otherwise change nothing without a word. ``who`` and
    ``leave_out`` name the overrides and the settings that leave layers out, as the caller's face does.
    """
    groups = kind_groups(family)
    out: dict[str, int] = {}
    for o in overrides:
        if o.kind not in groups:
            raise WorkbenchError(f"{who} {o.text()}: {o.kind!r} is not a kind of this model's linears; use one of "
                                 f"{', '.join(groups)}")
        first, last = o.blocks or (0, n_blocks - 1)
        if last >= n_blocks:
            raise WorkbenchError(f"{who} {o.text()}: the model has blocks 0-{n_blocks - 1}; give blocks in that range")
        hit = [n for b in range(first, last + 1) for k in groups[o.kind] if (n := family.layer_name(b, k)) in run]
        if not hit:
            raise WorkbenchError(f"{who} {o.text()} names only layers the run leaves in full precision ({leave_out}); "
                                 f"remove it or quantize those layers")
        out.update({n: o.bits for n in hit})
    return out
