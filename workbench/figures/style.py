"""Shared look: one color per method, log-axis helpers, the common layout."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

METHOD_COLORS = {"rtn": "#7f7f7f", "gptq": "#1f77b4", "boa": "#ff7f0e", "turboboa": "#2ca02c",
                 "turboboa-tuned": "#d62728"}
METHOD_LABELS = {"rtn": "RTN", "gptq": "GPTQ", "boa": "BoA", "turboboa": "TurboBoA", "aespa": "aespa",
                 "brecq": "BRECQ", "turboboa-tuned": "TurboBoA, tuned scales"}
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


def method_color(method: str, i: int = 0) -> str:
    return METHOD_COLORS.get(method, PALETTE[i % len(PALETTE)])


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, str(method))


def log10_or_nan(values) -> np.ndarray:
    """log10 of positive values; zeros and negatives cannot sit on a log scale, so they go blank."""
    v = np.asarray(values, dtype=float)
    out = np.full(v.shape, np.nan)
    pos = v > 0
    out[pos] = np.log10(v[pos])
    return out


def decade_ticks(zmin: float, zmax: float) -> tuple[list[float], list[str]]:
    """Colorbar ticks for a log10-valued color axis: whole decades, or 1-2-5 steps inside a narrow range."""
    if not np.isfinite(zmin) or not np.isfinite(zmax):
        return [], []
    lo, hi = int(np.floor(zmin)), int(np.ceil(zmax))
    step = max(1, (hi - lo) // 6)
    vals = [float(v) for v in range(lo, hi + 1, step) if zmin - 1e-9 <= v <= zmax + 1e-9]
    if len(vals) < 3:
        vals = [float(np.log10(m * 10.0 ** e)) for e in range(lo, hi + 1) for m in (1, 2, 5)
                if zmin - 1e-9 <= np.log10(m * 10.0 ** e) <= zmax + 1e-9]
    if len(vals) < 2:   # under a factor of two: label the ends
        return [zmin, zmax], [f"{10 ** zmin:.2g}", f"{10 ** zmax:.2g}"]
    return vals, [f"{10 ** v:.0e}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e") for v in vals]


def base_layout(fig: go.Figure, title: str, height: int = 380) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.01, xanchor="left"), template="plotly_white", height=height,
                      margin=dict(l=60, r=20, t=50, b=50), legend=dict(orientation="h", y=1.02, x=1,
                                                                        xanchor="right", yanchor="bottom"))
    return fig


def empty_figure(title: str, message: str = "no data yet", height: int = 380) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#888"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return base_layout(fig, title, height)
