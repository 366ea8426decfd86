"""Per-channel activation maxima of one layer's input, before and after rotation."""
from __future__ import annotations

import plotly.graph_objects as go
import torch

from .style import base_layout, empty_figure


def peak_ratio(values: torch.Tensor) -> float:
    """Largest channel maximum over the median one: how much a per-token grid is stretched by outliers."""
    med = float(values.median())
    return float(values.max()) / med if med > 0 else float("inf")


def outlier_figure(before: torch.Tensor | None, after: torch.Tensor | None, title: str = "Activation outliers") \
        -> go.Figure:
    """Two lines over the input channels: max |x| before and after rotation (log scale)."""
    if before is None or len(before) == 0:
        return empty_figure(title)
    fig = go.Figure()
    for name, values, color in (("before rotation", before, "#d62728"), ("after rotation", after, "#1f77b4")):
        if values is None:
            continue
        fig.add_trace(go.Scatter(x=list(range(len(values))), y=values.tolist(), mode="lines", name=
                                 f"{name} (max/median {peak_ratio(values):.1f})", line=dict(color=color, width=1),
                                 hovertemplate="channel %{x}<br>max |x| %{y:.3g}<extra>" + name + "</extra>"))
    fig.update_xaxes(title="input channel")
    fig.update_yaxes(title="max |x| over tokens", type="log")
    return base_layout(fig, title)
