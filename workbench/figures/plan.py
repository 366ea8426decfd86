"""A mixed-precision plan as a block x layer-kind heatmap of the widths it chose."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .style import base_layout, empty_figure

TITLE = "Bits per layer (block x layer kind)"
WIDTHS = (2, 8)          # the color axis: one scale for every plan, so a color always means the same width
COLORSCALE = "YlGnBu"
COST_PREFIX = "cost_"    # columns ``cost_<bits>``: a layer's predicted cost at that width


def _cost(value) -> str:
    return "not measured" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def _hover(row, alternatives: list[int], cost_label: str) -> str:
    head = f"block {row['block']} · {row['kind']}"
    if "name" in row and isinstance(row["name"], str):
        head += f"<br>{row['name']}"
    lines = [head, f"<b>{int(row['bits'])} bits</b>" + (" (pinned)" if row.get("pinned") else "")]
    if "cost" in row:
        lines.append(f"predicted {cost_label} {_cost(row['cost'])}")
    if alternatives:
        lines.append("at " + ", ".join(f"{b}: {_cost(row[f'{COST_PREFIX}{b}'])}" for b in alternatives))
    return "<br>".join(lines)


def plan_figure(table: pd.DataFrame, kinds: list[str] | None = None, *, title: str = TITLE,
                cost_label: str = "cost") -> go.Figure:
    """Blocks down, layer kinds across, each cell colored and labeled by the layer's width.

    ``table`` has one row per quantized layer: ``block``, ``kind``, ``bits``, and optionally ``name``,
    ``cost`` (the predicted cost at its width), ``pinned`` (a width fixed by hand) and ``cost_<b>``
    (the cost at each candidate width ``b``), all shown in the cell's hover text. ``kinds`` orders the
    columns (default: as they first appear); a layer the table lacks (left in full precision) is a
    blank cell. ``cost_label`` names the cost in the hover text (the sensitivity signal).
    """
    if table is None or len(table) == 0:
        return empty_figure(title, "press Make plan")
    kinds = list(kinds or dict.fromkeys(table["kind"]))
    blocks = sorted(int(b) for b in table["block"].unique())
    alternatives = sorted(int(c[len(COST_PREFIX):]) for c in table.columns if c.startswith(COST_PREFIX))
    z = np.full((len(blocks), len(kinds)), np.nan)
    text = [["" for _ in kinds] for _ in blocks]
    hover = [["full precision" for _ in kinds] for _ in blocks]
    names = [["" for _ in kinds] for _ in blocks]
    for _, row in table.iterrows():
        i, j = blocks.index(int(row["block"])), kinds.index(row["kind"])
        z[i, j] = int(row["bits"])
        text[i][j] = f"{int(row['bits'])}{'*' if row.get('pinned') else ''}"
        hover[i][j] = _hover(row, alternatives, cost_label)
        names[i][j] = row.get("name", "") or ""
    ticks = list(range(WIDTHS[0], WIDTHS[1] + 1))
    fig = go.Figure(go.Heatmap(
        z=z, x=kinds, y=blocks, zmin=WIDTHS[0], zmax=WIDTHS[1], colorscale=COLORSCALE, xgap=2, ygap=2,
        text=text, texttemplate="%{text}", hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
        customdata=names, colorbar=dict(title=dict(text="bits", side="right"), tickvals=ticks,
                                        ticktext=[str(t) for t in ticks])))
    fig.update_yaxes(title="block", autorange="reversed", tickmode="array", tickvals=blocks)
    fig.update_xaxes(title="layer kind", type="category")
    return base_layout(fig, title, height=max(260, 90 + 30 * len(blocks)))
