"""Hessian spectra: eigenvalue curves (log scale), condition numbers across layers, error vs spectrum."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .style import PALETTE, base_layout, decade_ticks, empty_figure, log10_or_nan, method_color, method_label

FLOOR = 1e-12   # eigenvalues below this fraction of the largest are float noise; keep them off the log axis


def _positive(eig: np.ndarray) -> np.ndarray:
    eig = np.asarray(eig, dtype=float)
    top = eig.max() if eig.size else 0.0
    return np.where(eig > top * FLOOR, eig, np.nan)


def spectrum_figure(eigenvalues: pd.DataFrame, names, *, normalize: bool = False,
                    title: str = "H_in spectrum") -> go.Figure:
    """Eigenvalues in descending order on a log axis, one line per layer ``name``.

    ``eigenvalues``: long frame (``name``, ``index``, ``eigenvalue``). ``normalize`` divides
    each spectrum by its largest eigenvalue, so layers of different scale share one axis.
    """
    names = [names] if isinstance(names, str) else list(names)
    fig = go.Figure()
    for i, name in enumerate(names):
        rows = eigenvalues[eigenvalues["name"] == name] if len(eigenvalues) else eigenvalues
        if len(rows) == 0:
            continue
        eig = rows.sort_values("index")["eigenvalue"].to_numpy(dtype=float)
        if normalize and eig.max() > 0:
            eig = eig / eig.max()
        fig.add_trace(go.Scatter(x=np.arange(1, eig.size + 1), y=_positive(eig), mode="lines", name=name,
                                 line=dict(color=PALETTE[i % len(PALETTE)], width=2),
                                 hovertemplate="#%{x}: %{y:.3g}<extra>" + name + "</extra>"))
    if not fig.data:
        return empty_figure(title)
    fig.update_xaxes(title="eigenvalue rank (largest first)")
    fig.update_yaxes(title="eigenvalue / largest" if normalize else "eigenvalue", type="log", exponentformat="e")
    return base_layout(fig, title)


def head_spectra_figure(head_eigenvalues: pd.DataFrame, block: int, kind: str, *, factor: str | None = None,
                        title: str | None = None) -> go.Figure:
    """One line per head: the spectra of the per-head factors of ``kind`` (q/k ``H_out``, v ``H_in``)."""
    title = title or f"Per-head {factor or ''} spectra, block {block}, {kind}".replace("  ", " ")
    if head_eigenvalues is None or len(head_eigenvalues) == 0:
        return empty_figure(title)
    rows = head_eigenvalues[(head_eigenvalues["block"] == block) & (head_eigenvalues["kind"] == kind)]
    if factor is not None:
        rows = rows[rows["factor"] == factor]
    if len(rows) == 0:
        return empty_figure(title, f"no per-head factors for {kind}")
    fig = go.Figure()
    for i, (head, h) in enumerate(rows.groupby("head", sort=True)):
        eig = h.sort_values("index")["eigenvalue"].to_numpy(dtype=float)
        fig.add_trace(go.Scatter(x=np.arange(1, eig.size + 1), y=_positive(eig), mode="lines", name=f"head {head}",
                                 line=dict(color=PALETTE[i % len(PALETTE)], width=1.5),
                                 hovertemplate="#%{x}: %{y:.3g}<extra>head " + str(head) + "</extra>"))
    fig.update_xaxes(title="eigenvalue rank (largest first)")
    fig.update_yaxes(title="eigenvalue", type="log", exponentformat="e")
    base_layout(fig, title)
    # one entry per head would wrap over the title in a horizontal legend
    fig.update_layout(legend=dict(orientation="v", x=1.02, y=1, xanchor="left", yanchor="top"))
    return fig


def condition_heatmap(layers: pd.DataFrame, value: str = "condition", *,
                      title: str = "Condition number of H_in across layers") -> go.Figure:
    """Blocks down, layer kinds across, color = log10 of ``value`` (any spectrum summary column)."""
    if layers is None or len(layers) == 0:
        return empty_figure(title)
    kinds = list(dict.fromkeys(layers["kind"]))
    table = layers.pivot_table(index="block", columns="kind", values=value, aggfunc="mean").sort_index()
    table = table[kinds]
    z = table.to_numpy(dtype=float)
    logz = log10_or_nan(z)
    finite = logz[np.isfinite(logz)]
    zmin, zmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if zmax - zmin < 1e-9:
        zmin, zmax = zmin - 0.5, zmax + 0.5
    ticks, text = decade_ticks(zmin, zmax)
    blocks = table.index.tolist()
    fig = go.Figure(go.Heatmap(z=logz, x=kinds, y=blocks, zmin=zmin, zmax=zmax, colorscale="Magma", customdata=z,
                               colorbar=dict(title=dict(text=value.replace("_", " ")), tickvals=ticks, ticktext=text),
                               hovertemplate="block %{y}, %{x}<br>" + value + " %{customdata:.3g}<extra></extra>"))
    fig.update_yaxes(title="block", autorange="reversed", tickmode="array",
                     tickvals=blocks[:: max(1, len(blocks) // 16)])
    fig.update_xaxes(title="layer kind")
    return base_layout(fig, title, height=max(280, 90 + 24 * len(blocks)))


def error_vs_spectrum(layers: pd.DataFrame, errors: pd.DataFrame, *, x: str = "condition", y: str = "rel_error",
                      method: str = "method", title: str | None = None) -> go.Figure:
    """Scatter of a layer's error against a summary of its ``H_in`` spectrum, joined on ``name``.

    ``layers``: the spectra summary frame; ``errors``: per-layer errors (a report frame), with a
    ``method`` column for one color per method. Log axes on both sides.
    """
    title = title or f"{y.replace('_', ' ')} against {x.replace('_', ' ')}"
    if layers is None or errors is None or len(layers) == 0 or len(errors) == 0:
        return empty_figure(title, "needs spectra and at least one quantization run")
    spec = layers[["name", "kind", x]] if x in layers.columns else None
    if spec is None or y not in errors.columns:
        return empty_figure(title, f"missing column {x if spec is None else y}")
    joined = errors.drop(columns=[c for c in ("kind",) if c in errors.columns]).merge(spec, on="name", how="inner")
    if len(joined) == 0:
        return empty_figure(title, "no layer in both frames")
    groups = joined.groupby(method, sort=False) if method in joined.columns else [("", joined)]
    fig = go.Figure()
    for i, (name, rows) in enumerate(groups):
        fig.add_trace(go.Scatter(
            x=rows[x], y=rows[y], mode="markers", name=method_label(name) or y,
            marker=dict(color=method_color(name, i), size=8, opacity=0.8, line=dict(width=0.5, color="white")),
            text=[f"{n} ({k})" for n, k in zip(rows["name"], rows["kind"])],
            hovertemplate="%{text}<br>" + x + " %{x:.3g}<br>" + y + " %{y:.3g}<extra></extra>"))
    fig.update_xaxes(title=x.replace("_", " "), type="log", exponentformat="e")
    fig.update_yaxes(title=y.replace("_", " "), type="log", exponentformat="e")
    return base_layout(fig, title)
