"""Figures for Genie: calibration images, the distillation loss, Genie-M's blocks, accuracy tables."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from ..genie.png import image_grid
from .style import base_layout, empty_figure


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


def confidence_text(confidence: float) -> str:
    """A probability as a percentage that never rounds up to a certainty it is not: 0.996 -> 99.6%."""
    pct = 100.0 * float(confidence)
    if pct >= 100.0:
        return "100%"
    if pct >= 99.95:
        return ">99.9%"
    return f"{pct:.1f}%" if pct >= 99.5 else f"{pct:.0f}%"


def prediction_captions(classes: Sequence[int], confidence: Sequence[float]) -> list[str]:
    """One caption per image: the full-precision model's class and its probability, e.g. ``7 · 98%``."""
    if len(classes) != len(confidence):
        raise ValueError(f"{len(classes)} classes but {len(confidence)} confidences")
    return [f"{int(c)} · {confidence_text(p)}" for c, p in zip(classes, confidence)]


def bn_loss_figure(steps: Sequence[int], losses: Sequence[float], total_steps: int | None = None,
                   batch_steps: int | None = None, title: str = "BN-statistics loss while distilling",
                   height: int = 320) -> go.Figure:
    """The distillation loss against the step (log scale), on an axis sized for ``total_steps`` so a
    live curve grows into place; dotted lines where a new batch (fresh generator and latents) starts."""
    if len(steps) == 0:
        return empty_figure(title, "no distillation steps (noise or real data)", height=height)
    fig = go.Figure(go.Scatter(x=list(steps), y=list(losses), mode="lines", name="BN loss",
                               line=dict(color="#1f77b4", width=2),
                               hovertemplate="step %{x}<br>loss %{y:.4g}<extra></extra>"))
    end = max(total_steps or 0, max(steps))
    if batch_steps and batch_steps < end:
        for b in range(batch_steps, end, batch_steps):
            fig.add_vline(x=b + 0.5, line=dict(color="#9ca3af", dash="dot", width=1))
    fig.update_xaxes(title="step (over all batches)", range=[0, end + 1])
    fig.update_yaxes(title="Σ over BN layers of ‖Δμ‖² + ‖Δσ‖²", type="log", exponentformat="e")
    return base_layout(fig, title, height)


def blocks_figure(units: Sequence[dict], names: Sequence[str] | None = None,
                  title: str = "Genie-M, block by block", height: int = 320) -> go.Figure:
    """Each finished block's relative output error on the calibration images, with round-to-nearest
    weights (where Genie-M starts) and after Genie-M; ``names`` fixes the axis to every block."""
    order = list(names or []) or [u["name"] for u in units]
    if not order:
        return empty_figure(title, "waiting for the first block", height=height)
    fig = go.Figure()
    for key, label, color in (("start_rel_error", "round to nearest", "#7f7f7f"), ("rel_error", "Genie-M", "#2ca02c")):
        fig.add_trace(go.Scatter(x=[u["name"] for u in units], y=[u[key] for u in units], mode="lines+markers",
                                 name=label, line=dict(color=color, width=2), marker=dict(size=8),
                                 hovertemplate="%{x}<br>" + label + " %{y:.3g}<extra></extra>"))
    fig.update_xaxes(title="block", type="category", categoryorder="array", categoryarray=order,
                     range=[-0.5, len(order) - 0.5])
    fig.update_yaxes(title="‖f_q(x_q) − f(x)‖² / ‖f(x)‖²", type="log", exponentformat="e")
    done = f"{len(units)} of {len(order)} blocks" if len(units) < len(order) else f"all {len(order)} blocks"
    return base_layout(fig, f"{title}: {done}", height)
