import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.quant.grid import GridConfig, group_params, rtn
from workbench.quant.rounding import (LearnedRounding, RoundingConfig, beta_at, learn_rounding,
                                      optimize_rounding, rectified_sigmoid, rounding_regularizer)


def correlated_problem(d_out=8, d_in=16, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g)
    mix = torch.randn(d_in, d_in, generator=g)
    x = mix @ torch.randn(d_in, n, generator=g)
    h = x @ x.T / n
    return w, h


def layer_loss(w_hat, w, h):
    """Relative layer error tr(dW H dW^T) / tr(W H W^T): order one, as the regularizer weight expects."""
    dw = w_hat - w
    return (dw @ h * dw).sum() / (w @ h * w).sum()


def assert_on_grid(res, grid, shape):
    """``res``: a QuantizedWeight of a weight of ``shape`` on ``grid``."""
    assert res.codes.shape == (shape[0], int(torch.tensor(shape[1:]).prod()))
    assert res.codes.dtype == torch.uint8 and res.grid == grid
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= grid.maxq
    width = res.codes.shape[1] // res.scale.shape[1]
    scale = res.scale.repeat_interleave(width, 1)
    zero = res.zero.repeat_interleave(width, 1)
    torch.testing.assert_close(res.dequantize(), scale * (res.codes.float() - zero), rtol=0, atol=1e-6)


def test_rectified_sigmoid_and_regularizer():
    v = torch.tensor([-20.0, 0.0, 20.0])
    torch.testing.assert_close(rectified_sigmoid(v), torch.tensor([0.0, 0.5, 1.0]))
    assert float(rounding_regularizer(torch.tensor([0.0, 1.0]), 2.0)) == 0.0
    assert float(rounding_regularizer(torch.tensor([0.5]), 2.0)) == 1.0


def test_beta_anneals_after_warmup():
    cfg = RoundingConfig(iters=100, warmup=0.2)
    assert beta_at(0, cfg) is None and beta_at(19, cfg) is None
    assert beta_at(20, cfg) == pytest.approx(20.0)
    assert beta_at(99, cfg) == pytest.approx(2.0, abs=0.3)
    betas = [beta_at(s, cfg) for s in range(20, 100)]
    assert all(a >= b for a, b in zip(betas, betas[1:]))


def test_soft_start_reproduces_the_weight():
    w, _ = correlated_problem()
    grid = GridConfig(bits=4, group_size=-1)
    r = LearnedRounding(w, grid)
    # the soft start is W itself wherever W lies inside the clamp range (the rounded zero
    # point can push the row's extremes just outside it)
    inside = ((r.base + r.zero) >= 0) & ((r.base + r.zero + 1) <= grid.maxq)
    assert float(inside.float().mean()) > 0.8
    torch.testing.assert_close(r()[inside], w[inside], atol=1e-4, rtol=0)


@pytest.mark.parametrize("learn_scale", [False, True])
def test_learned_rounding_ends_on_grid_and_beats_rtn(learn_scale):
    w, h = correlated_problem()
    grid = GridConfig(bits=3, group_size=-1)
    cfg = RoundingConfig(iters=400, lr=5e-2, learn_scale=learn_scale, scale_lr=1e-3)
    res, hist = learn_rounding(w, grid, lambda wq: layer_loss(wq, w, h), cfg)
    assert_on_grid(res, grid, w.shape)
    rtn_loss = float(layer_loss(rtn(w, grid), w, h))
    assert hist.final_loss == pytest.approx(float(layer_loss(res.dequantize(), w, h)), rel=1e-5)
    assert hist.final_loss < 0.5 * rtn_loss
    assert len(hist.loss) == (hist.settled_at or cfg.iters) and hist.beta[0] is None and hist.beta[-1] is not None


def test_learned_scale_moves_and_codes_stay_put():
    w, h = correlated_problem(seed=1)
    grid = GridConfig(bits=2, group_size=-1)
    r = LearnedRounding(w, grid, learn_scale=True)
    s0 = r.scale.detach().clone()
    base = r.base.clone()
    optimize_rounding([r], lambda: layer_loss(r(), w, h),
                      RoundingConfig(iters=300, lr=5e-2, learn_scale=True, scale_lr=1e-3))
    assert not torch.allclose(r.scale.detach(), s0)
    assert torch.equal(r.base, base)
    assert r.hard
    h_final = r.h()
    assert_on_grid(r.result(), grid, w.shape)
    # annealing leaves few soft values: the hard rounding barely changes the loss
    assert float(((h_final > 0.05) & (h_final < 0.95)).float().mean()) < 0.1


def test_grouped_conv_weight():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 8, 3, 3, generator=g)
    grid = GridConfig(bits=4, group_size=24)
    target = torch.randn(4, 8, 3, 3, generator=g) * 0.1 + w
    res, _ = learn_rounding(w, grid, lambda wq: ((wq - target) ** 2).sum(), RoundingConfig(iters=50))
    assert res.scale.shape == (4, 3)
    assert_on_grid(res, grid, w.shape)


def test_bad_configs_raise():
    with pytest.raises(WorkbenchError, match="iterations"):
        RoundingConfig(iters=0)
    with pytest.raises(WorkbenchError, match="warmup"):
        RoundingConfig(warmup=1.5)
    with pytest.raises(WorkbenchError, match="group size"):
        LearnedRounding(torch.randn(4, 10), GridConfig(bits=4, group_size=4))


@pytest.mark.parametrize("beta", [None, 2.0, 7.5])
@pytest.mark.parametrize("start", ["floor", "codes"])
def test_fused_soft_weight_matches_the_generic_formula(beta, start):
    """The fixed-grid fast path gives the same soft weight, regularizer and gradient as autograd
    through the written-out formula, including weights clamped at 0 or maxq and h clamped at 0 or 1."""
    torch.manual_seed(1)
    w = torch.randn(12, 32) * 3            # large weights: some codes sit at the clamp ends
    grid = GridConfig(bits=2, group_size=16)
    codes = None
    if start == "codes":
        scale, zero = group_params(w, grid)
        codes = torch.clamp(torch.round(w / scale.repeat_interleave(16, 1)) + zero.repeat_interleave(16, 1),
                            0, grid.maxq)
    fused = LearnedRounding(w, grid, codes=codes, init_margin=0.2)
    assert fused.fused
    with torch.no_grad():
        fused.v.add_(torch.randn_like(fused.v) * 3)    # h spread over (0, 1) and its clamped ends
    assert bool((fused.h() == 0).any()) and bool((fused.h() == 1).any())
    v_ref = fused.v.detach().clone().requires_grad_(True)
    target = torch.randn_like(w)

    fused.reg_beta = beta
    w_f = fused()
    reg_f = fused.step_regularizer(beta) if beta is not None else torch.zeros(())
    ((w_f - target).pow(2).sum() + 0.3 * reg_f).backward()

    h = rectified_sigmoid(v_ref)
    w_g = expand_scale(fused) * (torch.clamp(fused.offset + h, 0, grid.maxq) - fused.zero_cols)
    reg_g = rounding_regularizer(h, beta) if beta is not None else torch.zeros(())
    ((w_g - target).pow(2).sum() + 0.3 * reg_g).backward()

    torch.testing.assert_close(w_f, w_g)
    torch.testing.assert_close(reg_f, reg_g)
    torch.testing.assert_close(fused.v.grad, v_ref.grad)


def expand_scale(r):
    return r.scale.repeat_interleave(r.d_in // r.scale.shape[1], 1)


def test_learned_scale_takes_the_generic_path():
    w, _ = correlated_problem()
    assert not LearnedRounding(w, GridConfig(bits=3, group_size=8), learn_scale=True).fused


@pytest.mark.parametrize("bits", [2, 3])
def test_fixed_grid_optimizer_follows_the_autograd_one(bits):
    """The compiled fixed-grid steps (soft weight, then gradient and Adam in place) walk the same
    path as autograd and torch.optim.Adam on the same loss, warmup and regularizer included."""
    torch.manual_seed(3)
    w, h = correlated_problem()
    grid = GridConfig(bits=bits, group_size=8)
    cfg = RoundingConfig(iters=16, lr=0.05, warmup=0.25, reg_weight=0.05)
    fast, slow = LearnedRounding(w, grid), LearnedRounding(w, grid)
    hist_fast = optimize_rounding([fast], lambda: layer_loss(fast(), w, h), cfg)
    unused = torch.zeros(1, requires_grad=True)     # an extra parameter group: the autograd path
    hist_slow = optimize_rounding([slow], lambda: layer_loss(slow(), w, h), cfg,
                                  extra_params=[{"params": [unused], "lr": 0.1}])
    torch.testing.assert_close(fast.v, slow.v, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(hist_fast.loss), torch.tensor(hist_slow.loss), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(hist_fast.reg), torch.tensor(hist_slow.reg), rtol=1e-4, atol=1e-4)
    assert hist_fast.reg[0] == 0 and hist_fast.reg[-1] > 0
    assert_on_grid(fast.result(), grid, w.shape)


def test_a_cancelled_optimization_leaves_the_rounder_hard():
    w, h = correlated_problem()
    r = LearnedRounding(w, GridConfig(bits=3, group_size=8))

    def cancel(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimize_rounding([r], lambda: layer_loss(r(), w, h), RoundingConfig(iters=10), callback=cancel)
    assert r.hard and r.step_weight is None
    assert_on_grid(r.result(), GridConfig(bits=3, group_size=8), w.shape)


def test_a_settled_rounding_stops_with_what_every_step_would_give(monkeypatch):
    """Once every h sits at 0 or 1 no step can move a soft weight: the run stops there, with the
    rounding, the variables' signs and the final loss of the run that takes every step."""
    from workbench.quant import rounding
    w, h = correlated_problem()
    grid = GridConfig(bits=3, group_size=8)
    cfg = RoundingConfig(iters=400, lr=0.1, warmup=0.1, reg_weight=0.5)
    early = LearnedRounding(w, grid)
    hist_early = optimize_rounding([early], lambda: layer_loss(early(), w, h), cfg)
    assert hist_early.settled_at is not None and hist_early.settled_at < cfg.iters
    assert len(hist_early.loss) == hist_early.settled_at

    monkeypatch.setattr(rounding, "settled", lambda rounders: False)
    full = LearnedRounding(w, grid)
    hist_full = optimize_rounding([full], lambda: layer_loss(full(), w, h), cfg)
    assert hist_full.settled_at is None and len(hist_full.loss) == cfg.iters
    assert torch.equal(early.result().codes, full.result().codes)
    assert torch.equal(early.v > 0, full.v > 0)
    assert hist_early.final_loss == hist_full.final_loss
    assert set(hist_full.loss[hist_early.settled_at:]) == {hist_full.loss[hist_early.settled_at - 1]}
    assert set(hist_full.reg[hist_early.settled_at:]) == {0.0}


def test_a_rounding_that_has_not_settled_runs_every_step():
    w, h = correlated_problem()
    r = LearnedRounding(w, GridConfig(bits=3, group_size=8))
    hist = optimize_rounding([r], lambda: layer_loss(r(), w, h), RoundingConfig(iters=30, lr=0.01, reg_weight=1e-4))
    assert hist.settled_at is None and len(hist.loss) == 30


def test_a_hessian_grid_search_takes_the_columns_weights_when_the_rounding_makes_its_grids():
    from workbench.quant.grid import GridConfig, group_params
    from workbench.quant.rounding import LearnedRounding
    g = torch.Generator().manual_seed(5)
    W = torch.randn(8, 64, generator=g)
    weight = torch.ones(64)
    weight[:8] = 1000.0
    grid = GridConfig(bits=2, group_size=32, search="hessian")
    r = LearnedRounding(W, grid, column_weight=weight)
    assert torch.equal(r.scale, group_params(W.float(), grid, weight)[0])
    assert not torch.equal(r.scale, LearnedRounding(W, grid).scale)     # without weights: the MSE search
