"""Per-layer error curves: one line per method, layers in the order the engine visits them."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from .style import base_layout, empty_figure, method_color, method_label


def layer_labels(frame: pd.DataFrame) -> list[str]:
    """``block.kind`` per row, e.g. ``3.q``: short enough for an axis."""
    return [f"{b}.{k}" for b, k in zip(frame["block"], frame["kind"])]


def layer_error_figure(frame: pd.DataFrame, value: str = "rel_error", method: str = "method", *,
                       title: str = "Relative output error per layer", log: bool = True,
                       total_layers: int | None = None, axis_labels: list[str] | None = None) -> go.Figure:
    """Lines of ``value`` against the layer position, one per distinct ``method``.

    ``frame`` has one row per layer (``block``, ``kind``, ``value``) in engine order, for one or
    several methods (``method`` column; absent = one line). ``total_layers`` fixes the x range so
    a live plot grows into a stable axis; ``axis_labels`` names all positions in advance.
    """
    if frame is None or len(frame) == 0:
        return empty_figure(title)
    groups = frame.groupby(method, sort=False) if method in frame.columns else [("", frame)]
    fig = go.Figure()
    labels = list(axis_labels or [])
    for i, (name, rows) in enumerate(groups):
        rows_labels = layer_labels(rows)
        if len(rows_labels) > len(labels):
            labels = rows_labels
        fig.add_trace(go.Scatter(
            x=list(range(len(rows))), y=rows[value].tolist(), mode="lines+markers", name=method_label(name) or value,
            line=dict(color=method_color(name, i), width=2), marker=dict(size=5),
            text=rows["name"].tolist() if "name" in rows else rows_labels,
            hovertemplate="%{text}<br>" + value + " %{y:.3g}<extra>" + (method_label(name) or "") + "</extra>"))
    n = max(total_layers or 0, len(labels))
    step = max(1, n // 24)   # keep the tick labels legible on deep models
    fig.update_xaxes(title="layer (block.kind)", tickmode="array", tickvals=list(range(0, len(labels), step)),
                     ticktext=labels[::step], range=[-0.5, max(n, 1) - 0.5])
    fig.update_yaxes(title=value.replace("_", " "), type="log" if log else "linear", exponentformat="e")
    return base_layout(fig, title)


def progress_figure(frame: pd.DataFrame, total_layers: int, *, value: str = "rel_error", method: str = "method",
                    title: str | None = None, axis_labels: list[str] | None = None) -> go.Figure:
    """The live view of a run: the error curve so far on an axis sized for the whole run."""
    done = 0 if frame is None else len(frame)
    title = title or f"Layers finished: {done} / {total_layers}"
    return layer_error_figure(frame, value, method, title=title, total_layers=total_layers, axis_labels=axis_labels)


def kind_error_figure(frame: pd.DataFrame, value: str = "rel_error", method: str = "method", *,
                      title: str = "Mean error by layer kind") -> go.Figure:
    """Grouped bars: the mean of ``value`` per layer kind, one bar group per method."""
    if frame is None or len(frame) == 0:
        return empty_figure(title)
    kinds = list(dict.fromkeys(frame["kind"]))
    groups = frame.groupby(method, sort=False) if method in frame.columns else [("", frame)]
    fig = go.Figure()
    for i, (name, rows) in enumerate(groups):
        means = rows.groupby("kind")[value].mean()
        fig.add_trace(go.Bar(x=kinds, y=[means.get(k) for k in kinds], name=method_label(name) or value,
                             marker_color=method_color(name, i)))
    fig.update_yaxes(title=value.replace("_", " "), type="log", exponentformat="e")
    fig.update_xaxes(title="layer kind")
    fig.update_layout(barmode="group")
    return base_layout(fig, title)
