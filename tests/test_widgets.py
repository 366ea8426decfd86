"""The Jupyter widgets, driven from code on tiny models: results, live updates and figures."""
from __future__ import annotations

import os
import time

import plotly.graph_objects as go
import pytest

pytest.importorskip("ipywidgets")

from workbench.config import QUICK_LOOK  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.widgets import (AttentionExplorer, CompareWidget, GenieGallery, PlanWidget,  # noqa: E402
                               QuantizeWidget, SpectrumExplorer, notebook_settings)
from workbench.widgets.common import FAST_ENV, FIGURE_WIDGETS_ENV, MODEL_ENV, LiveFigure  # noqa: E402

LAYERS = 14            # tiny LLaMA: 2 blocks x 7 linears
SMALL = dict(group_size=32, calib_samples=4, seqlen=64, max_blocks=None, eval_windows=2)


@pytest.fixture(scope="module", autouse=True)
def fast_env():
    old = os.environ.get(FAST_ENV)
    os.environ[FAST_ENV] = "1"
    yield
    if old is None:
        os.environ.pop(FAST_ENV, None)
    else:
        os.environ[FAST_ENV] = old


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def compared(llama):
    w = CompareWidget(model=llama, **SMALL)
    w.run()
    return w


def test_notebook_settings_follow_the_environment(monkeypatch):
    monkeypatch.setenv(FAST_ENV, "1")
    monkeypatch.setenv(MODEL_ENV, "/some/model")
    s = notebook_settings()
    assert s == dict(calib_samples=4, seqlen=64, max_blocks=2, eval_windows=2, model="/some/model")
    monkeypatch.setenv(FAST_ENV, "0")
    monkeypatch.delenv(MODEL_ENV)
    assert "bits" not in notebook_settings()      # each notebook chooses its bits
    assert notebook_settings(bits=4) == {**QUICK_LOOK, "bits": 4, "model": "smollm2-135m"}


def test_quantize_widget_grows_live_and_reports(llama):
    w = QuantizeWidget(model=llama, method="gptq", bits=4, plot_every=0.0, **SMALL)
    lengths = []
    show = w.curve.show

    def recording(fig):
        show(fig)
        lengths.append(sum(len(t.y) for t in w.figure.data if t.y is not None))
    w.curve.show = recording
    result = w.run()
    assert w.state == "done" and result is w.result
    assert [e.kind for e in w.events][0] == "start" and w.events[-1].kind == "done"
    assert sum(e.kind == "layer_finished" for e in w.events) == LAYERS
    assert w.runner.progress.value == w.runner.progress.max == LAYERS
    # the curve was redrawn after every layer, one point more each time, then the final figure
    assert lengths[-1] == LAYERS and lengths[1:LAYERS + 1] == list(range(1, LAYERS + 1))
    assert len(w.figure.data) == 1 and list(w.figure.data[0].y) == w.frame["rel_error"].tolist()
    assert w.frame.shape[0] == LAYERS and w.report.ppl_quant is not None
    assert len(w.kinds_figure.data) == 1 and len(w.kinds_figure.data[0].x) == 7
    assert "gptq" in w.summary.value and "rel_error" in w.table.value


def test_quantize_widget_form_values_reach_the_engine(llama):
    w = QuantizeWidget(model=llama, **SMALL)
    w.form.set(method="rtn", bits=3, max_blocks=1)
    w.run()
    cfg = w.report.config
    assert (w.report.method, cfg["bits"], cfg["max_blocks"], cfg["group_size"]) == ("rtn", 3, 1, 32)
    assert len(w.figure.data[0].y) == 7


def test_quantize_widget_cancel_and_errors(llama):
    w = QuantizeWidget(model=llama, method="gptq", **SMALL)
    w.run(wait=False)
    with pytest.raises(WorkbenchError, match="already in progress"):
        w.run(wait=False)
    assert w.cancel()
    assert w.wait() == "cancelled" and w.result is None
    assert not w.cancel()   # nothing runs now
    with pytest.raises(WorkbenchError):
        w.run(bits=9)        # refused by the form before any thread starts
    bad = QuantizeWidget(model=os.path.join(llama, "missing"), **SMALL)
    with pytest.raises(Exception):
        bad.run()
    assert bad.state == "error" and "missing" in bad.runner.status.value


def test_quantize_widget_without_figure_widgets(tiny_checkpoints):
    w = QuantizeWidget(model=tiny_checkpoints["opt"], method="rtn", use_figure_widget=False, **SMALL)
    assert not isinstance(w.figure, go.FigureWidget)
    w.run()
    assert isinstance(w.figure, go.Figure) and len(w.figure.data[0].y) == 12   # OPT: 2 blocks x 6
    assert w.curve.updates >= 2


def test_live_figure_can_be_asked_to_skip_figure_widgets(monkeypatch):
    monkeypatch.setenv(FIGURE_WIDGETS_ENV, "0")
    live = LiveFigure(go.Figure())
    assert not live.use_widget and not isinstance(live.figure, go.FigureWidget)
    live.show(go.Figure(go.Scatter(x=[1, 2], y=[3, 4])))
    assert list(live.figure.data[0].y) == [3, 4] and live.updates == 1
    assert not live.on_click(lambda x, y: None)    # clicks need a FigureWidget


def test_compare_widget_side_by_side(compared):
    w = compared
    assert w.state == "done" and list(w.outcomes) == ["gptq", "boa", "turboboa"]
    assert [t.name for t in w.figure.data] == ["GPTQ", "BoA", "TurboBoA"]
    assert all(len(t.y) == LAYERS for t in w.figure.data)
    assert len(w.heatmaps_figure.data) == 3 and all(t.type == "heatmap" for t in w.heatmaps_figure.data)
    assert all(len(t.z) == 2 and len(t.z[0]) == 4 for t in w.heatmaps_figure.data)   # 2 blocks x 4 heads
    assert len(w.kinds_figure.data) == 3
    assert w.summary["method"].tolist() == ["gptq", "boa", "turboboa"]
    assert w.summary["ppl_fp"].nunique() == 1            # the same model and settings for all three
    assert w.frame.shape[0] == 3 * LAYERS and "heldout_rel_error" in w.frame
    before = [list(map(list, t.z)) for t in w.heatmaps_figure.data]
    w.reading.value = "before_o"
    assert [list(map(list, t.z)) for t in w.heatmaps_figure.data] != before


def test_plan_widget_plans_pins_and_runs(llama, tmp_path):
    from workbench.mixed.plan import read_plan
    w = PlanWidget(model=llama, method="gptq", avg_bits=4.5, **SMALL)
    assert w.fields["avg_bits"].value == 4.5 and w.fields["avg_bits"].description == "Average bits"
    draft = w.run()
    record = draft.plan.record
    assert w.state == "done" and record["size_bytes"] <= record["budget_bytes"] and record["avg_bits"] <= 4.5
    heat = w.figure.data[0]
    assert heat.type == "heatmap" and len(heat.z) == 2 and len(heat.z[0]) == 7
    assert sorted(int(v) for row in heat.z for v in row) == sorted(draft.bits.values())
    assert len(w.layer.options) == LAYERS and "Predicted:" in w.summary.value
    # a cell of the heatmap chooses the layer to pin; the pin plans again without measuring
    w._cell_clicked("down", 1)
    assert w.layer.value == "down@1"
    pinned = w.pin(bits=2)
    assert pinned.seconds == 0 and pinned.bits["model.layers.1.mlp.down_proj"] == 2
    assert w.fields["keep_bits"].value == "down@1:2" and "1 pinned" in w.summary.value
    # a new budget is planned at once from the same costs
    w.fields["avg_bits"].value = 5.0
    w.wait()
    assert w.draft.config.avg_bits == 5.0 and w.draft.seconds == 0 and w.draft.plan.record["avg_bits"] <= 5.0
    result = w.run_plan(method="rtn")
    assert result.report.method == "rtn" and result.report.plan["layers"] == w.draft.bits
    assert result.report.ppl_quant is not None and "Measured with RTN:" in w.summary.value
    assert read_plan(w.save_plan(tmp_path / "plan.json")) == w.draft.bits
    # a budget below the smallest plan is refused in the widget's words, the plan shown kept
    kept = w.draft
    with pytest.raises(WorkbenchError, match=r"^Average bits 2.0 is below the smallest plan: .* give Average bits "
                                             r"\d\.\d{4} or more$"):
        w.run(avg_bits=2.0)
    assert w.draft is kept and w.state == "error"
    with pytest.raises(WorkbenchError, match="the PlanWidget has no field max_size"):
        PlanWidget(model=llama, max_size=0.05)


def test_spectrum_explorer(llama):
    w = SpectrumExplorer(model=llama, **SMALL)
    spectra = w.run()
    assert w.state == "done" and len(w.layers) == LAYERS and spectra is w.spectra
    w.select("1.k", factor="k")
    assert w.layer.value == "model.layers.1.self_attn.k_proj"
    assert len(w.figure.data) == 1 and len(w.figure.data[0].y) == 64          # H_in of the 64-wide input
    assert len(w.heads_figure.data) == 2                                       # 2 KV heads
    w.select(factor="q")
    assert len(w.heads_figure.data) == 4                                       # 4 query heads
    w.select("0.down", normalize=True)
    assert max(v for v in w.figure.data[0].y if v == v) == pytest.approx(1.0)
    assert len(w.figure.data[0].y) == 128
    assert w.condition_figure.data[0].type == "heatmap" and len(w.condition_figure.data[0].z) == 2
    with pytest.raises(ValueError):
        w.select("7.q")


def test_attention_explorer_from_a_compare_run(compared):
    spectra = SpectrumExplorer(model=compared.form.model.value, **SMALL).run()
    w = AttentionExplorer.from_outcome(compared.outcomes["boa"], spectra=spectra)
    assert w.figure.data[0].type == "heatmap" and len(w.figure.data[0].z) == 2
    heads = w.heads
    worst = heads.loc[heads["after_o"].idxmax()]
    assert w.selected == (int(worst["block"]), int(worst["head"]))      # opens on the worst head
    w.select(1, 2)
    assert w.selected == (1, 2)
    assert [len(t.y) for t in w.head_figure.data] == [2, 2, 2]          # three readings across 2 blocks
    expected = heads[(heads["head"] == 2)].sort_values("block")["after_o"].tolist()
    assert list(w.head_figure.data[1].y) == pytest.approx(expected)
    assert len(w.head_spectrum_figure.data) == 1 and "head 2" in w.head_spectrum_figure.layout.title.text
    assert "block 1, head 2" in w.cell.value


def test_attention_explorer_runs_its_own_method(llama):
    w = AttentionExplorer(model=llama, method="rtn", **SMALL)
    w.run(spectra=False)
    assert w.state == "done" and w.outcome.method == "rtn" and w.spectra is None
    assert len(w.heads) == 2 * 4 and w.selected is not None


def test_genie_gallery():
    import html
    import re

    import torch

    from workbench.genie.evaluate import predictions
    from workbench.widgets.genie import digits, gallery_html
    w = GenieGallery(show=8, samples=16, distill_steps=3, distill_batch=16, iters=5, weight_bits=4, refresh=0)
    drawn = []
    w.gallery.observe(lambda change: drawn.append(change["new"]), names="value")
    images = w.synthesize()
    assert images.shape == (16, 1, 16, 16)
    # the gallery was drawn while distilling, and at the end shows the first 8 images with the
    # full-precision model's class and probability under each
    assert len(drawn) >= 3 and len(set(drawn)) == len(drawn)      # snapshots at steps 0, 1, 2, then the end
    assert w.gallery.value.count("<img ") == 8 and len(w.captions) == 8
    loaded, _ = digits(w.config())
    classes, confidence = predictions(loaded.model, images[:8])
    assert [c.split(" · ")[0] for c in w.captions] == [str(int(c)) for c in classes]
    shown = re.findall(r"<figcaption[^>]*>([^<]*)</figcaption>", w.gallery.value)
    assert [html.unescape(c) for c in shown] == w.captions
    assert w.loss_figure.data[0].type == "scatter" and list(w.loss_figure.data[0].x) == [1, 2, 3]
    row = w.quantize()                 # the same settings: quantized on the images above
    assert row["images"] == 16 and row["quantizer"] == "Genie-M" and 0 <= row["quantized"] <= 100
    assert len(w.last_units) == 5 and list(w.blocks_figure.data[1].x) == [u.name for u in w.last_units]
    w.quantize(method="rtn", data="noise")
    assert [r["data"] for r in w.rows] == ["genie", "noise"]
    table = w.figure.data[0]
    assert table.type == "table" and len(table.cells.values[0]) == 2
    assert "no images yet" in gallery_html(None, [])
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        gallery_html(torch.zeros(2, 1, 4, 4), ["a"])


def test_genie_gallery_cancel_and_bad_settings():
    with pytest.raises(WorkbenchError, match="no setting colour"):
        GenieGallery(colour=3)
    w = GenieGallery(show=4, samples=16, distill_steps=2000, distill_batch=16, iters=5)
    w.synthesize(wait=False)
    deadline = time.time() + 60
    while not w.trace.steps and time.time() < deadline:
        time.sleep(0.05)
    assert w.cancel()
    assert w.wait(30) == "cancelled" and w.images is None
    assert len(w.trace.steps) < 2000
