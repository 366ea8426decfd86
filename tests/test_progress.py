"""Progress of the phases besides the layer walk: perplexity windows, held-out blocks, the export and a
model's conversion, as events with the right counts, and as what the CLI, the app and the widgets show."""
from __future__ import annotations

import io

import pytest
import torch

from workbench import api, workspace
from workbench.api import quantize
from workbench.cli import main
from workbench.config import QuantizeConfig
from workbench.engine import Event
from workbench.evaluate import perplexity
from workbench.export import unique_state
from workbench.models.loading import load_model
from workbench.progress import ProgressBars, phase_progress, progress_label

from tests.conftest import tiny_llama

FAST = dict(calib_samples=2, seqlen=32, bits=4, group_size=16, device="cpu", batch_size=2, method="rtn")


def progress_of(events, phase: str) -> list[tuple[int, int]]:
    return [(e.index, e.total) for e in events if e.kind == "progress" and e.message.endswith(phase)]


def test_perplexity_counts_its_windows_and_is_the_same_number():
    model = tiny_llama()
    windows = torch.randint(0, 512, (5, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    with_progress = perplexity(model, windows, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, 5), (2, 5), (4, 5), (5, 5)]
    assert with_progress == perplexity(model, windows, batch_size=2)


def test_quantize_emits_both_evaluations_and_the_export(tiny_checkpoints, tmp_path):
    events = []
    result = quantize(model=tiny_checkpoints["llama"], eval_windows=3, on_event=events.append,
                      save_dir=tmp_path / "saved", **FAST)
    kinds = [e.kind for e in events]
    fp, q = progress_of(events, "full-precision perplexity"), progress_of(events, "quantized perplexity")
    assert fp == [(0, 3), (2, 3), (3, 3)] and q == [(0, 3), (2, 3), (3, 3)]
    first_fp = next(i for i, e in enumerate(events) if e.kind == "progress" and "full-precision" in e.message)
    first_q = next(i for i, e in enumerate(events) if e.kind == "progress" and "quantized" in e.message)
    assert first_fp < kinds.index("start") and kinds.index("done") < first_q      # before and after the layers
    saved = progress_of(events, "saving pack-quantized")
    tensors = len(unique_state(result.model))
    assert saved == [(i, tensors) for i in range(tensors + 1)]
    assert all(e.unit == "window" for e in events if e.kind == "progress" and "perplexity" in e.message)
    # layer events keep their own counts: the progress events never touch them
    assert [e.total for e in events if e.kind == "layer_finished"] == [14] * 14


def test_the_workspace_adds_held_out_blocks_and_a_conversion_when_the_loader_reports_one(tiny_checkpoints):
    steps = []

    def converting_loader(spec, progress=None):   # stands in for the embedded model's first conversion
        for i in range(3):
            progress(i, 2)
        steps.append(spec)
        return load_model(spec)

    events = []
    cfg = QuantizeConfig(model=tiny_checkpoints["llama"], eval_windows=2, **FAST)
    workspace.run(cfg, models=workspace.ModelCache(loader=converting_loader), on_event=events.append, heldout=2)
    assert progress_of(events, "held-out errors") == [(0, 2), (1, 2), (2, 2)]
    assert progress_of(events, "(first use only)") == [(0, 2), (1, 2), (2, 2)] and len(steps) == 1
    assert progress_of(events, "full-precision perplexity") == [(0, 2), (2, 2)]
    # a loader that takes no progress still loads
    workspace.run(cfg, models=workspace.ModelCache(loader=lambda spec: load_model(spec)), heldout=1)


def test_progress_bars_on_stderr():
    out = io.StringIO()
    bars = ProgressBars("rtn w4", file=out)
    emit = phase_progress(bars, "rtn: full-precision perplexity", "window")
    for i in (0, 2, 3):
        emit(i, 3)
    bars(Event("start", total=2))
    bars(Event("layer_finished", index=1, total=2, block=0, layer_kind="q", rel_error=0.1))
    bars(Event("block_finished", index=1, total=2, block=0))       # the engine's: inside the layer walk, ignored
    bars(Event("layer_finished", index=2, total=2, block=0, layer_kind="k", rel_error=0.2))
    bars(Event("done", index=2, total=2))
    bars(Event("block_finished", index=1, total=1, block=0))       # a walk of the model (spectra)
    bars.close()
    text = out.getvalue()
    assert "rtn: full-precision perplexity: 100%" in text and "3/3" in text and "window" in text
    assert "rtn w4: 100%" in text and "2/2" in text and "k@0 err=2.00e-01" in text
    assert "Hessian spectra: 100%" in text
    assert progress_label(Event("progress", index=1, total=1, message="saving", unit="layer")) == "saving, 1/1 layer"
    quiet = io.StringIO()
    ProgressBars("x", enabled=False, file=quiet)(Event("progress", index=0, total=3, message="m", unit="window"))
    assert quiet.getvalue() == ""


def test_cli_shows_the_evaluations(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(api, "_FP_PERPLEXITY", {})   # an earlier test's full-precision perplexity would be reused
    args = ["quantize", "--model", tiny_checkpoints["llama"], "--eval-windows", "2", "--report",
            str(tmp_path / "r.json"), *[f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "rtn: full-precision perplexity: 100%" in err and "rtn: quantized perplexity: 100%" in err
    assert "2/2" in err and "rtn w4: 100%" in err
    assert main([*args, "--quiet"]) == 0
    assert "perplexity" not in capsys.readouterr().err


def test_the_quantize_tab_shows_the_windows_on_its_bar(tiny_checkpoints):
    import gradio as gr

    from workbench.ui.form import build_form
    from workbench.ui.quantize_tab import build_quantize_tab, stream_quantize
    from workbench.ui.session import Session
    start = {**{k: v for k, v in FAST.items() if k != "method"}, "model": tiny_checkpoints["llama"],
             "eval_windows": 2, "max_blocks": None}
    models = workspace.ModelCache()
    with gr.Blocks():
        session = gr.State(Session)
        form = build_form(start)
        view = build_quantize_tab(form, session, models)
    values = [c.value for c in form.fields.values()]
    bars = [u[view.progress] for u in stream_quantize(Session(), models, form, view, "rtn", values)
            if view.progress in u]
    windows = [b for b in bars if "quantized perplexity, " in b]
    assert windows and 'data-done="2" data-total="2"' in windows[-1] and "2/2 windows" in windows[-1]
    assert any('data-done="0" data-total="2"' in b and "held-out errors, 0/2 blocks" in b for b in bars)
    assert 'data-state="done" data-done="14" data-total="14"' in bars[-1]


def test_the_quantize_widget_says_the_windows(tiny_checkpoints):
    pytest.importorskip("ipywidgets")
    from workbench.widgets import QuantizeWidget
    w = QuantizeWidget(model=tiny_checkpoints["llama"], eval_windows=2, max_blocks=None,
                       **{k: v for k, v in FAST.items() if k not in ("device",)})
    said, bars = [], []
    say, set_progress = w.runner.say, w.runner.set_progress
    w.runner.say = lambda text, kind="info": said.append(text) or say(text, kind)
    w.runner.set_progress = lambda done, total: bars.append((done, total)) or set_progress(done, total)
    w.run()
    assert "rtn: quantized perplexity, 2/2 windows" in said and (2, 2) in bars
    assert w.report.ppl_quant is not None and w.state == "done"
