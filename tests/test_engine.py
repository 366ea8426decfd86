import threading

import pytest
import torch

import workbench
from workbench.engine import BlockQuantizer
from workbench.errors import Cancelled
from workbench.models.loading import load_model
from workbench.quant.grid import expand_groups

SMALL = dict(calib_samples=4, seqlen=64, eval_windows=2, batch_size=2, device="cpu")


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_gptq_run_on_tiny_model(tiny_checkpoints, arch, tmp_path):
    res = workbench.quantize(model=tiny_checkpoints[arch], method="gptq", bits=3, group_size=16,
                             report_path=tmp_path / "r.json", **SMALL)
    rep = res.report
    family = load_model(tiny_checkpoints[arch]).family
    assert len(rep.layers) == 2 * len(family.linears)
    assert [r.kind for r in rep.layers[: len(family.linears)]] == list(family.linears)
    assert all(r.loss >= 0 and 0 <= r.rel_error < 1 and r.seconds >= 0 for r in rep.layers)
    assert rep.ppl_fp > 1 and rep.ppl_quant > 1 and rep.quant_seconds > 0 and rep.peak_memory_bytes > 0
    # every weight is exactly the dequantized code on its group grid
    modules = dict(res.model.named_modules())
    for name, p in res.packed.items():
        W = modules[name].weight.data
        rebuilt = (p.codes.float() - expand_groups(p.zero, W.shape[1])) * expand_groups(p.scale, W.shape[1])
        assert torch.allclose(rebuilt, W, atol=1e-6), name
    back = workbench.Report.from_json(tmp_path / "r.json")
    assert back.to_frame().shape[0] == len(rep.layers)
    assert back.config["seed"] == 0 and back.config["bits"] == 3


def test_gptq_error_below_rtn_on_tiny_llama(tiny_checkpoints):
    errs = {}
    for method in ("rtn", "gptq"):
        rep = workbench.quantize(model=tiny_checkpoints["llama"], method=method, bits=3, group_size=16, **SMALL).report
        errs[method] = rep.to_frame()["loss"].sum()
    assert errs["gptq"] < errs["rtn"]


class Capturing(BlockQuantizer):
    """Keeps the q/k/v-stage inputs the engine calibrated each block on."""

    def stage_statistics(self, block, kinds, stages, ctx, xs):
        if kinds[0] == "q":
            self.seen = getattr(self, "seen", []) + [torch.cat([s.x for s in stages])]
        return {}


@torch.no_grad()
def test_next_block_is_calibrated_on_quantized_outputs(tiny_checkpoints):
    from workbench.data import calibration_windows
    from workbench.methods import method_spec
    from workbench.quant.grid import GridConfig
    from workbench.quant.solver import SolverConfig
    loaded = load_model(tiny_checkpoints["llama"])
    ids = calibration_windows(loaded.tokenizer, "wikitext2", 4, 32, 0)
    eng = Capturing(loaded.model, loaded.family, method_spec("gptq"), GridConfig(bits=2, group_size=16),
                    SolverConfig(), torch.device("cpu"), batch_size=2)
    eng.run(ids)
    model = loaded.model
    h = model.model.embed_tokens(ids)
    rot = model.model.rotary_emb(h, torch.arange(32)[None])
    h1 = model.model.layers[0](h, position_embeddings=rot, attention_mask=None)   # block 0 now quantized
    h1 = h1[0] if isinstance(h1, tuple) else h1
    expected = model.model.layers[1].input_layernorm(h1)
    assert torch.allclose(eng.seen[1], expected, atol=1e-4)


def test_events_and_cancellation(tiny_checkpoints):
    events = []
    cancel = threading.Event()

    def on_event(ev):
        events.append(ev)
        if ev.kind == "layer_finished" and ev.index == 3:
            cancel.set()

    with pytest.raises(Cancelled):
        workbench.quantize(model=tiny_checkpoints["llama"], method="gptq", on_event=on_event, cancel=cancel,
                           bits=4, group_size=16, **SMALL)
    events = [e for e in events if e.kind not in ("phase", "progress")]   # loading and perplexity bars
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and events[0].total == 14
    assert kinds.count("layer_finished") == 3
    assert kinds[1:3] == ["layer_started", "layer_finished"]
    finished = [e for e in events if e.kind == "layer_finished"]
    assert [e.layer_kind for e in finished] == ["q", "k", "v"] and all(e.seconds is not None for e in finished)


def test_max_blocks_limits_the_run(tiny_checkpoints):
    rep = workbench.quantize(model=tiny_checkpoints["opt"], method="rtn", max_blocks=1, **SMALL).report
    assert {r.block for r in rep.layers} == {0}
