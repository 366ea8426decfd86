"""The workspace: one model cache, runs on private copies, outcomes with their tables, cancel anywhere."""
from __future__ import annotations

import threading

import pytest
import torch

from workbench import workspace
from workbench.config import QuantizeConfig
from workbench.errors import Cancelled
from workbench.workspace import ModelCache


def small(model, **kw) -> QuantizeConfig:
    return QuantizeConfig(**{**dict(model=model, method="gptq", bits=3, group_size=16, calib_samples=4, seqlen=32,
                                    eval_windows=2, device="cpu", batch_size=2, max_blocks=1), **kw})


def test_a_run_leaves_the_shared_model_alone_and_joins_its_tables(tiny_checkpoints):
    models = ModelCache()
    shared = models.get(tiny_checkpoints["llama"])
    before = {k: v.clone() for k, v in shared.loaded.model.state_dict().items()}
    phases = []
    out = workspace.run(small(tiny_checkpoints["llama"]), models=models, heldout=2,
                        on_event=lambda ev: ev.kind == "phase" and phases.append(ev.message))
    assert all(torch.equal(before[k], v) for k, v in shared.loaded.model.state_dict().items())
    assert models.get(tiny_checkpoints["llama"]) is shared                       # loaded once
    assert set(out.reconstruction.layers["block"]) == {0} and (out.reconstruction.layers["rel_error"] > 0).all()
    assert set(out.layers["name"]) == {r.name for r in out.report.layers}        # joined with the report
    assert out.layers["heldout_rel_error"].notna().all() and out.method == "gptq"
    assert out.report.ppl_fp is not None and out.report.ppl_quant is not None
    assert out.summary()["ppl_quant"] == out.report.ppl_quant
    assert any("perplexity" in p for p in phases) and any("held-out" in p for p in phases)
    # the full-precision perplexity is computed once per model and text
    again = workspace.run(small(tiny_checkpoints["llama"], method="rtn"), models=models, heldout=2)
    assert again.report.ppl_fp == out.report.ppl_fp


@pytest.mark.parametrize("phase", ["full-precision perplexity", "quantized perplexity", "held-out", "calibrating"])
def test_cancel_stops_a_run_in_every_phase(tiny_checkpoints, phase):
    models = ModelCache()
    cancel = threading.Event()

    def on_event(ev):
        if ev.kind == "phase" and phase in ev.message:
            cancel.set()
    with pytest.raises(Cancelled):
        workspace.run(small(tiny_checkpoints["llama"]), models=models, on_event=on_event, cancel=cancel, heldout=2)


def test_spectra_stream_blocks_and_cancel(tiny_checkpoints):
    models = ModelCache()
    cfg = small(tiny_checkpoints["opt"], max_blocks=None)
    blocks = []
    spectra = workspace.spectra(cfg, models=models, on_event=lambda ev: ev.kind == "block_finished"
                                and blocks.append((ev.index, ev.total)))
    assert blocks == [(1, 2), (2, 2)] and set(spectra.layers["block"]) == {0, 1}
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        workspace.spectra(cfg, models=models, cancel=cancel,
                          on_event=lambda ev: ev.kind == "block_finished" and cancel.set())
