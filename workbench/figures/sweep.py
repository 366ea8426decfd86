"""A sweep's figures: perplexity against bits per method, and quantization time per method.

Interactive (plotly, for the HTML files) and static (matplotlib, for the PNG files), from the same
summary frame (one row per finished point: method, bits, group_size, seed, ppl_quant, quant_seconds).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from .style import method_color, method_label


def _series(frame: pd.DataFrame):
    """(method, group size, bits, mean ppl over seeds, mean seconds) per line, in a stable order."""
    if not len(frame):
        return []
    mean = frame.groupby(["method", "group_size", "bits"], sort=True)[["ppl_quant", "quant_seconds"]].mean()
    out = []
    for (method, group), part in mean.groupby(level=[0, 1], sort=True):
        part = part.droplevel([0, 1])
        out.append((method, group, part.index.to_list(), part["ppl_quant"].to_list(), part["quant_seconds"].to_list()))
    return out


def _name(method, group) -> str:
    return f"{method_label(method)} {'per channel' if group == -1 else f'g{group}'}"


def ppl_vs_bits_figure(frame: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for i, (method, group, bits, ppl, _) in enumerate(_series(frame)):
        fig.add_trace(go.Scatter(x=bits, y=ppl, mode="lines+markers", name=_name(method, group),
                                 line=dict(color=method_color(method, i), dash="solid" if group != -1 else "dot")))
    fig.update_layout(title="Perplexity against bits (mean over seeds)", xaxis_title="weight bits",
                      yaxis_title="perplexity", yaxis_type="log", template="plotly_white")
    return fig


def seconds_figure(frame: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for i, (method, group, bits, _, seconds) in enumerate(_series(frame)):
        fig.add_trace(go.Bar(x=[f"w{b}" for b in bits], y=seconds, name=_name(method, group),
                             marker_color=method_color(method, i)))
    fig.update_layout(title="Quantization time per point (mean over seeds)", xaxis_title="setting",
                      yaxis_title="seconds", barmode="group", template="plotly_white")
    return fig


def save_png(frame: pd.DataFrame, which: str, path: Path) -> Path:
    """The same figure as a PNG (matplotlib: no browser needed), written through a temporary file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = _series(frame)
    if which == "ppl_vs_bits":
        for i, (method, group, bits, ppl, _) in enumerate(series):
            ax.plot(bits, ppl, marker="o", label=_name(method, group), color=method_color(method, i),
                    linestyle="-" if group != -1 else ":")
        ax.set(xlabel="weight bits", ylabel="perplexity", yscale="log", title="Perplexity against bits")
        ax.set_xticks(sorted({b for s in series for b in s[2]}))
    else:
        width = 0.8 / max(len(series), 1)
        labels = sorted({b for s in series for b in s[2]})
        for i, (method, group, bits, _, seconds) in enumerate(series):
            xs = [labels.index(b) + i * width for b in bits]
            ax.bar(xs, seconds, width=width, label=_name(method, group), color=method_color(method, i))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], [f"w{b}" for b in labels])
        ax.set(ylabel="seconds", title="Quantization time per point")
    if series:
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
