"""Figures are pure functions of frames: check traces, axes and scales on small hand-made frames."""
import numpy as np
import pandas as pd
import pytest

from workbench.figures import (attention_heatmap, attention_heatmaps, condition_heatmap, error_vs_spectrum,
                               head_spectra_figure, kind_error_figure, layer_error_figure, progress_figure,
                               spectrum_figure)
from workbench.figures.style import decade_ticks

KINDS = ["q", "k", "v", "o", "gate", "up", "down"]


def report_frame(method, scale=1.0, blocks=2):
    rows = [{"method": method, "name": f"model.layers.{b}.{k}", "block": b, "kind": k,
             "rel_error": scale * (1e-3 + 1e-4 * i), "loss": 1.0}
            for i, (b, k) in enumerate((b, k) for b in range(blocks) for k in KINDS)]
    return pd.DataFrame(rows)


def heads_frame(blocks=3, heads=4, scale=1.0):
    return pd.DataFrame([{"block": b, "head": h, "after_o": scale * 10.0 ** -(1 + b + h / 4), "before_o": 0.01}
                         for b in range(blocks) for h in range(heads)])


def test_layer_error_one_line_per_method_on_log_axis():
    frame = pd.concat([report_frame("gptq"), report_frame("rtn", 3.0)])
    fig = layer_error_figure(frame)
    assert [t.name for t in fig.data] == ["GPTQ", "RTN"]
    assert fig.layout.yaxis.type == "log"
    assert list(fig.data[0].x) == list(range(14)) and fig.data[1].y[0] == pytest.approx(3e-3)
    assert fig.layout.xaxis.ticktext[:2] == ("0.q", "0.k")


def test_progress_axis_is_sized_for_the_whole_run():
    fig = progress_figure(report_frame("boa").head(3), total_layers=14)
    assert tuple(fig.layout.xaxis.range) == (-0.5, 13.5)
    assert "3 / 14" in fig.layout.title.text and len(fig.data) == 1


def test_empty_frames_give_a_placeholder():
    for fig in (layer_error_figure(pd.DataFrame()), attention_heatmaps({}), condition_heatmap(pd.DataFrame()),
                error_vs_spectrum(pd.DataFrame(), None)):
        assert len(fig.data) == 0 and len(fig.layout.annotations) == 1


def test_attention_heatmaps_share_one_color_scale():
    fig = attention_heatmaps({"gptq": heads_frame(), "boa": heads_frame(scale=0.1)})
    assert len(fig.data) == 2 and all(t.type == "heatmap" for t in fig.data)
    assert fig.data[0].zmin == fig.data[1].zmin and fig.data[0].zmax == fig.data[1].zmax
    z = np.asarray(fig.data[0].z)
    assert z.shape == (3, 4)                                             # blocks down, heads across
    assert z[1, 2] == pytest.approx(-(1 + 1 + 2 / 4))                    # colors are log10 of the error
    assert np.asarray(fig.data[0].customdata)[1, 2] == pytest.approx(10 ** -2.5)
    assert [a.text for a in fig.layout.annotations] == ["GPTQ", "BoA"]
    assert fig.data[0].showscale is False and fig.data[1].showscale is True
    assert fig.data[1].zmin <= np.nanmin(np.asarray(fig.data[1].z))


def test_single_heatmap_axes():
    fig = attention_heatmap(heads_frame(), "before_o")
    assert list(fig.data[0].x) == ["h0", "h1", "h2", "h3"] and list(fig.data[0].y) == [0, 1, 2]
    assert fig.layout.yaxis.autorange == "reversed"


def spectra_frames():
    layers, eigs = [], []
    for b in range(2):
        for i, k in enumerate(KINDS):
            name = f"model.layers.{b}.{k}"
            layers.append({"name": name, "block": b, "kind": k, "condition": 10.0 ** (i + b), "effective_rank": 3.0})
            e = np.array([10.0, 1.0, 0.1, 0.0])
            eigs.append(pd.DataFrame({"name": name, "block": b, "kind": k, "index": range(4), "eigenvalue": e}))
    return pd.DataFrame(layers), pd.concat(eigs, ignore_index=True)


def test_spectrum_is_descending_on_log_axis_and_drops_zeros():
    layers, eigs = spectra_frames()
    fig = spectrum_figure(eigs, ["model.layers.0.q", "model.layers.1.q"], normalize=True)
    assert len(fig.data) == 2 and fig.layout.yaxis.type == "log"
    assert list(fig.data[0].x) == [1, 2, 3, 4]
    y = np.asarray(fig.data[0].y, dtype=float)
    assert y[0] == 1.0 and y[2] == pytest.approx(0.01) and np.isnan(y[3])   # a zero cannot sit on a log axis


def test_head_spectra_one_line_per_head():
    eigs = pd.concat([pd.DataFrame({"block": 0, "kind": "k", "head": h, "factor": "H_out", "index": range(3),
                                    "eigenvalue": [3.0, 2.0, 1.0]}) for h in range(2)])
    fig = head_spectra_figure(eigs, 0, "k")
    assert [t.name for t in fig.data] == ["head 0", "head 1"] and fig.layout.yaxis.type == "log"
    assert len(head_spectra_figure(eigs, 0, "q").data) == 0


def test_condition_heatmap_blocks_by_kinds():
    layers, _ = spectra_frames()
    fig = condition_heatmap(layers)
    assert list(fig.data[0].x) == KINDS and list(fig.data[0].y) == [0, 1]
    assert np.asarray(fig.data[0].z)[1, 3] == pytest.approx(4.0)
    vals, text = decade_ticks(fig.data[0].zmin, fig.data[0].zmax)
    assert list(fig.data[0].colorbar.tickvals) == vals and text[0] == "1e0"


def test_error_vs_spectrum_joins_on_name():
    layers, _ = spectra_frames()
    errors = pd.concat([report_frame("gptq"), report_frame("rtn", 2.0)])
    fig = error_vs_spectrum(layers, errors, x="condition")
    assert [t.name for t in fig.data] == ["GPTQ", "RTN"]
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert len(fig.data[0].x) == 14 and fig.data[0].x[3] == pytest.approx(1e3)


def test_kind_bars():
    fig = kind_error_figure(pd.concat([report_frame("gptq"), report_frame("rtn")]))
    assert len(fig.data) == 2 and list(fig.data[0].x) == KINDS
