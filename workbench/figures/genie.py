"""Figures for Genie: a gallery of calibration images and an accuracy table."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from ..genie.png import image_grid


def samples_figure(images, nrow: int | None = None, title: str = "Calibration images",
                   upscale: int = 4) -> go.Figure:
    """[N, C, H, W] images (C = 1 or 3), each stretched to its own range, as one tiled picture."""
    pixels = image_grid(images, nrow=nrow, upscale=upscale)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    fig = go.Figure(go.Image(z=pixels, hoverinfo="skip"))
    fig.update_layout(title=title, margin=dict(l=10, r=10, t=40, b=10),
                      width=pixels.shape[1] + 20, height=pixels.shape[0] + 60)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def accuracy_table_figure(rows: Sequence[dict], title: str = "Top-1 accuracy (%)") -> go.Figure:
    """Rows like {"setting": "W4A4", "RTN": 99.2, "Genie-D": 99.7, ...}: one column per key.

    Numbers are shown with two decimals; missing cells stay empty.
    """
    if not rows:
        raise ValueError("no rows to show")
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if v is None:
            return ""
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    values = [[cell(r.get(c)) for r in rows] for c in columns]
    fig = go.Figure(go.Table(header=dict(values=columns, align="left"),
                             cells=dict(values=values, align="left")))
    fig.update_layout(title=title, margin=dict(l=10, r=10, t=40, b=10))
    return fig
