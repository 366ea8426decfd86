"""Block-wise tuning of the group scales after the solve (method turboboa-tuned) on tiny models."""
import pytest
import torch

import workbench
from workbench.errors import WorkbenchError
from workbench.methods import METHODS
from workbench.methods.scale_tuning import ScaleTuning, TunedScales
from workbench.quant.grid import GridConfig, expand_groups, grid_functions, group_params
from workbench.quant.solver import SolverConfig
from workbench.quant.weight import from_codes

SMALL = dict(calib_samples=8, seqlen=32, eval_windows=2, batch_size=2, device="cpu")


def packed(W, grid):
    s, z = group_params(W, grid)
    codes = grid_functions(grid)[1](W, expand_groups(s, W.shape[1]), expand_groups(z, W.shape[1]), grid.maxq)
    return from_codes(codes, s, z, grid)


@pytest.mark.parametrize("grid", [GridConfig(bits=2, group_size=16), GridConfig.for_lattice("q4_1")],
                         ids=["zero point", "stored minimum"])
def test_the_stand_in_starts_at_the_packed_weight_and_tunes_only_the_scales(grid):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 32, generator=g)
    q = packed(W, grid)
    m = TunedScales(torch.nn.Linear(32, 6, bias=False), q)
    torch.testing.assert_close(m.weight(), q.dequantize(), rtol=0, atol=1e-6)
    x = torch.randn(3, 32, generator=g)
    with torch.no_grad():
        m.u.add_(0.1)
        y = m(x)
    tuned = m.tuned()
    assert torch.equal(tuned.codes, q.codes) and torch.equal(tuned.zero, q.zero)
    if grid.lattice is None:        # a lattice puts the scales back on its float16 values
        torch.testing.assert_close(tuned.scale, q.scale * torch.exp(torch.tensor(0.1)))
        torch.testing.assert_close(y, x @ tuned.dequantize().T, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(tuned.scale, tuned.scale.half().float())


def test_bad_tuning_options_are_refused():
    with pytest.raises(WorkbenchError, match="tuning steps"):
        ScaleTuning(steps=-1)
    with pytest.raises(WorkbenchError, match="learning rate"):
        ScaleTuning(lr=0.0)
    with pytest.raises(WorkbenchError, match="--tune-steps applies to turboboa-tuned, not turboboa"):
        workbench.quantize(method="turboboa", tune_steps=5)


def test_tuning_lowers_every_block_loss_and_keeps_the_codes(tiny_checkpoints):
    common = dict(model=tiny_checkpoints["llama"], bits=2, group_size=16, e2e_steps=0, **SMALL)
    events = []
    tuned = workbench.quantize(method="turboboa-tuned", tune_steps=30, tune_lr=0.02, on_event=events.append, **common)
    solved = workbench.quantize(method="turboboa-tuned", tune_steps=0, **common)
    layers = tuned.report.layers
    assert len(layers) == 14 and tuned.report.ppl_quant is not None
    assert any(e.kind == "phase" and "tuning the scales" in (e.message or "") for e in events)
    for rec in layers:
        assert rec.extra["tuning_kept"] is (rec.extra["block_loss_tuned"] < rec.extra["block_loss_solved"])
    assert all(rec.extra["tuning_kept"] for rec in layers)          # on these blocks tuning helps
    assert "tuning" in tuned.report.timings and "tuning" not in solved.report.timings
    for name, q in tuned.packed.items():
        ref = solved.packed[name]
        if ".layers.0." in name:      # block 0 sees the same inputs either way: only its scales move
            assert torch.equal(q.codes, ref.codes) and torch.equal(q.zero, ref.zero)
        layer = dict(tuned.model.named_modules())[name]
        torch.testing.assert_close(layer.weight.data, q.dequantize(), rtol=0, atol=1e-6)
    assert any(not torch.equal(q.scale, solved.packed[n].scale) for n, q in tuned.packed.items())
    # the records hold the final weights' error, with the solve's beside it
    assert all("rel_error_solved" in rec.extra for rec in layers)


def test_without_any_steps_it_is_turboboa_at_its_damping(tiny_checkpoints):
    common = dict(model=tiny_checkpoints["llama"], bits=3, group_size=16, **SMALL)
    a = workbench.quantize(method="turboboa-tuned", tune_steps=0, e2e_steps=0, **common)
    b = workbench.quantize(method="turboboa", damp=METHODS["turboboa-tuned"].solver.damp, **common)
    assert a.report.ppl_quant == b.report.ppl_quant
    assert all(torch.equal(q.codes, b.packed[n].codes) for n, q in a.packed.items())


def test_its_solver_differs_from_turboboa_only_in_damping():
    import dataclasses
    tuned, turbo = METHODS["turboboa-tuned"].solver, METHODS["turboboa"].solver
    assert dataclasses.replace(tuned, damp=turbo.damp) == turbo and isinstance(tuned, SolverConfig)


def test_a_block_that_tuning_makes_worse_keeps_its_solved_scales(tiny_checkpoints):
    common = dict(model=tiny_checkpoints["llama"], bits=2, group_size=16, max_blocks=1, e2e_steps=0, **SMALL)
    wild = workbench.quantize(method="turboboa-tuned", tune_steps=20, tune_lr=1.0, **common)
    solved = workbench.quantize(method="turboboa-tuned", tune_steps=0, **common)
    rec = wild.report.layers[0]
    assert rec.extra["block_loss_tuned"] >= rec.extra["block_loss_solved"] and rec.extra["tuning_kept"] is False
    for name, q in wild.packed.items():
        assert torch.equal(q.scale, solved.packed[name].scale)
        torch.testing.assert_close(dict(wild.model.named_modules())[name].weight.data, q.dequantize(), rtol=0,
                                   atol=1e-6)
    assert wild.report.ppl_quant == solved.report.ppl_quant


def test_end_to_end_steps_lower_the_loss_they_train_on_and_move_only_scales(tiny_checkpoints):
    common = dict(model=tiny_checkpoints["llama"], bits=2, group_size=16, tune_steps=0, **{**SMALL, "calib_samples": 2})
    events = []
    trained = workbench.quantize(method="turboboa-tuned", e2e_steps=60, e2e_lr=0.05, on_event=events.append, **common)
    solved = workbench.quantize(method="turboboa-tuned", e2e_steps=0, **common)
    e2e = trained.report.end_to_end
    assert e2e["steps"] == 60 and e2e["loss_last_steps"] < e2e["loss_first_steps"]
    assert solved.report.end_to_end == {} and "end_to_end" in trained.report.timings
    steps = [e for e in events if e.kind == "progress" and "end to end" in e.message]
    assert steps[0].index == 0 and steps[-1].index == steps[-1].total == 60
    for name, q in trained.packed.items():
        ref = solved.packed[name]
        assert torch.equal(q.codes, ref.codes) and torch.equal(q.zero, ref.zero)
        torch.testing.assert_close(dict(trained.model.named_modules())[name].weight.data, q.dequantize(), rtol=0,
                                   atol=1e-6)
    assert all(p.requires_grad for p in trained.model.parameters())    # the model is given back as it was
    assert all(type(m) is not TunedScales for m in trained.model.modules())


def test_a_model_read_from_disk_is_refused_before_any_work(tiny_checkpoints):
    with pytest.raises(WorkbenchError, match="--offload disk reads one block at a time, and turboboa-tuned trains"):
        workbench.quantize(model=tiny_checkpoints["llama"], method="turboboa-tuned", offload="disk", **SMALL)
