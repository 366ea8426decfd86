"""The sensitivity signals: the errors and gradients they are made of, against direct computations, and
the agreement measure that chooses between them."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from workbench.data import calibration_windows
from workbench.hessians import InputCovariance
from workbench.mixed.agreement import measure_agreement, ranks, spearman
from workbench.mixed.plan import run_layers
from workbench.mixed.sensitivity import (FISHER, OBJECTIVE, candidate_errors, fisher_costs, objective_costs,
                                         row_errors, row_errors_of)
from workbench.models.loading import load_model
from workbench.quant.grid import GridConfig, rtn

GRID = GridConfig(bits=4, group_size=16)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    loaded = load_model(tiny_checkpoints["llama"])
    ids = calibration_windows(loaded.tokenizer, "wikitext2", 4, 32, 0)
    return loaded, ids


def inputs_and_outputs(model, name, ids):
    """The inputs a layer sees in the model's own forward, and its outputs with their loss gradients."""
    seen = {}

    def hook(module, args, out):
        seen["x"] = args[0].detach()
        out.retain_grad()
        seen["y"] = out

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(ids, use_cache=False).logits[:, :-1]
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return seen["x"], seen["y"].grad


def test_row_errors_are_the_output_errors_per_row():
    torch.manual_seed(0)
    W, X = torch.randn(24, 32), torch.randn(500, 32) @ torch.randn(32, 32)
    cov = InputCovariance(32, CPU)
    cov.add(X)
    errors = row_errors_of(W, cov.H, GRID, (2, 4))
    for b in (2, 4):
        dW = rtn(W, GridConfig(bits=b, group_size=16)) - W
        torch.testing.assert_close(errors.candidates[b], (X @ dW.T).pow(2).mean(0).double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(errors.energy, (X @ W.T).pow(2).mean(0).double(), rtol=1e-4, atol=1e-6)
    assert float(errors.candidates[2].sum()) > float(errors.candidates[4].sum())


def test_the_walk_sees_the_inputs_of_the_full_precision_model(llama):
    (loaded, ids), name = llama, "model.layers.1.mlp.down_proj"
    wanted = (name, "model.layers.0.self_attn.k_proj")
    layers = [l for l in run_layers(loaded.model, loaded.family, None, ()) if l.name in wanted]
    errors = row_errors(loaded.model, loaded.family, layers, ids, GRID, (3,), CPU, batch_size=2)
    assert set(errors) == {l.name for l in layers}
    x, _ = inputs_and_outputs(loaded.model, name, ids)
    W = loaded.model.get_submodule(name).weight.data
    dW = rtn(W, GridConfig(bits=3, group_size=16)) - W
    x = x.reshape(-1, x.shape[-1])
    torch.testing.assert_close(errors[name].candidates[3], (x @ dW.T).pow(2).mean(0).double(), rtol=1e-3, atol=1e-8)


def test_candidate_errors_stack_each_widths_rounding_error():
    torch.manual_seed(0)
    W = torch.randn(8, 32)
    stack = candidate_errors(W, GRID, (2, 4))
    assert stack.shape == (16, 32)
    for i, b in enumerate((2, 4)):
        torch.testing.assert_close(stack[8 * i:8 * (i + 1)], rtn(W, GridConfig(bits=b, group_size=16)) - W)


def test_fisher_costs_weigh_each_tokens_error_by_its_own_gradient(llama):
    loaded, ids = llama
    model = loaded.model
    layers = run_layers(model, loaded.family, None, ())
    before = [p.requires_grad for p in model.parameters()]
    costs = fisher_costs(model, layers, ids, GRID, (2, 3, 4, 8), CPU, batch_size=3)  # batches of 3 and 1: sums
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())
    assert set(costs) == {l.name for l in layers}
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"):
        x, g = inputs_and_outputs(model, name, ids)
        x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        W = model.get_submodule(name).weight.data
        for b in (2, 3, 4, 8):
            dW = rtn(W, GridConfig(bits=b, group_size=16)) - W
            brute = 0.5 * float((g.pow(2) * (x @ dW.T).pow(2)).sum()) / ids.numel()
            assert costs[name][b] == pytest.approx(brute, rel=1e-4)
            # not the product of the means, which the token-by-token weighing replaces
            means = 0.5 * float((g.pow(2).mean(0) * (x @ dW.T).pow(2).mean(0)).sum())
            assert costs[name][b] != pytest.approx(means, rel=1e-3)
    for by_bits in costs.values():
        assert by_bits[2] > by_bits[3] > by_bits[4] > by_bits[8] > 0


def test_objective_costs_are_relative_output_errors(llama):
    loaded, ids = llama
    layers = run_layers(loaded.model, loaded.family, None, ())
    errors = row_errors(loaded.model, loaded.family, layers, ids, GRID, (2, 3, 4, 8), CPU, batch_size=2)
    objective = objective_costs(errors)
    for name, e in errors.items():
        for b in (2, 3, 4, 8):
            assert objective[name][b] == pytest.approx(float(e.candidates[b].sum() / e.energy.sum()))
        assert objective[name][2] > objective[name][3] > objective[name][4] > objective[name][8] > 0
        assert 0 < objective[name][8] < 1e-3


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        a = torch.randint(0, 5, (12,), generator=gen).tolist()
        b = torch.randn(12, generator=gen).tolist()
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_agreement_rounds_one_layer_at_a_time_and_restores_it(llama, tokenizer):
    loaded, ids = llama
    model = loaded.model
    names = [l.name for l in run_layers(model, loaded.family, 1, ())]
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    grid = GridConfig(bits=2, group_size=16)
    costs = {"first": {n: float(i) for i, n in enumerate(names)}, "last": {n: -float(i) for i, n in enumerate(names)}}
    windows = calibration_windows(tokenizer, "wikitext2", 2, 32, 1)
    found = measure_agreement(model, names, windows, grid, costs, CPU, batch_size=2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in kept.items())
    assert set(found.ppl_rise) == set(names) and found.ppl_fp > 1
    assert found.spearman["first"] == pytest.approx(-found.spearman["last"])
    assert -1 <= found.spearman["first"] <= 1


def test_both_signals_are_compared_on_the_first_blocks(llama, tokenizer):
    from workbench.config import QuantizeConfig
    from workbench.mixed.agreement import compare_signals
    loaded, ids = llama
    cfg = QuantizeConfig(model="tiny", avg_bits=4.0, candidate_bits=(3, 4), group_size=16, grid_search="minmax",
                         batch_size=2, device="cpu").validate()
    windows = calibration_windows(tokenizer, "wikitext2", 2, 32, 1)
    found = compare_signals(loaded.model, loaded.family, cfg, ids, windows, 1, CPU)
    assert found.bits == 3 and set(found.spearman) == {FISHER, OBJECTIVE}
    assert sorted(found.ppl_rise) == sorted(l.name for l in run_layers(loaded.model, loaded.family, 1, ()))
