"""Attention reconstruction error as block x head heatmaps (log color scale)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import base_layout, decade_ticks, empty_figure, log10_or_nan, method_label

COLORSCALE = "Viridis"


def head_grid(heads: pd.DataFrame, value: str) -> tuple[np.ndarray, list[int], list[int]]:
    """``[blocks, heads]`` array of ``value`` from a per-head frame (``block``, ``head``, value)."""
    table = heads.pivot_table(index="block", columns="head", values=value, aggfunc="mean").sort_index()
    return table.to_numpy(dtype=float), table.index.tolist(), table.columns.tolist()


def _heatmap(z, blocks, head_ids, value, zmin, zmax, showscale, customdata=None):
    ticks, text = decade_ticks(zmin, zmax)
    return go.Heatmap(z=log10_or_nan(z), x=[f"h{h}" for h in head_ids], y=blocks, zmin=zmin, zmax=zmax,
                      colorscale=COLORSCALE, showscale=showscale, customdata=z,
                      colorbar=dict(title=dict(text="rel. error", side="right"), tickvals=ticks, ticktext=text),
                      hovertemplate="block %{y}, head %{x}<br>" + value + " %{customdata:.3g}<extra></extra>")


def _range(grids) -> tuple[float, float]:
    logs = np.concatenate([log10_or_nan(z).ravel() for z in grids]) if grids else np.array([])
    logs = logs[np.isfinite(logs)]
    if logs.size == 0:
        return -6.0, 0.0
    lo, hi = float(logs.min()), float(logs.max())
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)


def attention_heatmap(heads: pd.DataFrame, value: str = "after_o", *,
                      title: str = "Attention error per head") -> go.Figure:
    """One heatmap: blocks down, heads across, color = log10 of the relative error."""
    if heads is None or len(heads) == 0:
        return empty_figure(title)
    z, blocks, head_ids = head_grid(heads, value)
    zmin, zmax = _range([z])
    fig = go.Figure(_heatmap(z, blocks, head_ids, value, zmin, zmax, True))
    fig.update_yaxes(title="block", autorange="reversed", tickmode="array", tickvals=blocks)
    fig.update_xaxes(title="head")
    return base_layout(fig, title, height=max(260, 60 + 28 * len(blocks)))


def attention_heatmaps(frames: dict[str, pd.DataFrame], value: str = "after_o", *,
                       title: str = "Attention error per head (block x head), shared color scale") -> go.Figure:
    """Side-by-side heatmaps, one per method, on one color scale so colors compare across panels."""
    frames = {m: f for m, f in frames.items() if f is not None and len(f)}
    if not frames:
        return empty_figure(title)
    grids = {m: head_grid(f, value) for m, f in frames.items()}
    zmin, zmax = _range([g[0] for g in grids.values()])
    fig = make_subplots(rows=1, cols=len(grids), subplot_titles=[method_label(m) for m in grids],
                        shared_yaxes=True, horizontal_spacing=0.03)
    n_blocks = 1
    for i, (m, (z, blocks, head_ids)) in enumerate(grids.items()):
        fig.add_trace(_heatmap(z, blocks, head_ids, value, zmin, zmax, i == len(grids) - 1), row=1, col=i + 1)
        fig.update_xaxes(title="head", row=1, col=i + 1)
        n_blocks = max(n_blocks, len(blocks))
        fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=blocks, row=1, col=i + 1)
    fig.update_yaxes(title="block", row=1, col=1)
    return base_layout(fig, title, height=max(280, 90 + 28 * n_blocks))


def block_attention_figure(blocks: pd.DataFrame, values=("before_o", "after_o"), method: str = "method", *,
                           title: str = "Attention error per block") -> go.Figure:
    """Lines per block of the whole-attention error, one per method and reading."""
    from .style import method_color
    if blocks is None or len(blocks) == 0:
        return empty_figure(title)
    groups = blocks.groupby(method, sort=False) if method in blocks.columns else [("", blocks)]
    fig = go.Figure()
    dashes = ["solid", "dot", "dash", "dashdot"]
    for i, (name, rows) in enumerate(groups):
        for j, v in enumerate(values):
            fig.add_trace(go.Scatter(x=rows["block"], y=rows[v], mode="lines+markers",
                                     name=f"{method_label(name)} {v}".strip(),
                                     line=dict(color=method_color(name, i), dash=dashes[j % len(dashes)])))
    fig.update_xaxes(title="block", dtick=1)
    fig.update_yaxes(title="relative error", type="log", exponentformat="e")
    return base_layout(fig, title)
