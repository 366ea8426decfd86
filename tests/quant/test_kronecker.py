"""The Kronecker-aware solver (BoA, TurboBoA) against brute force on tiny problems."""
import dataclasses

import pytest
import torch

from workbench.quant.grid import GridConfig, expand_groups
from workbench.quant.solver import (SolverConfig, damped, dx_corrected_target, inverse_cholesky_upper,
                                    kronecker_loss, refine_scales, row_compensation, solve)


def spd(n, seed, strength=1.0, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n, n) if batch is None else (batch, n, n)
    A = torch.randn(*shape, generator=g)
    return strength * A @ A.transpose(-1, -2) + 0.1 * torch.eye(n)


def problem(seed, heads=3, d_head=8, cols=16):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(heads * d_head, cols, generator=g)
    return W, spd(cols, seed + 1), spd(d_head, seed + 2, batch=heads)


@pytest.mark.parametrize("rows_per_step", [1, 3, 8])
@pytest.mark.parametrize("grid_at_start", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("search", ["minmax", "mse"])
def test_identity_output_factor_gives_gptq(rows_per_step, grid_at_start, act_order, search):
    """Also with act-order: the row-wise grids, taken in the original column order, are GPTQ's."""
    W, H_in, _ = problem(0)
    grid = GridConfig(bits=3, group_size=8, search=search)
    cfg = SolverConfig(rows_per_step=rows_per_step, grid_at_start=grid_at_start, act_order=act_order)
    eye = torch.eye(8).expand(3, 8, 8).clone()
    assert torch.equal(solve(W, H_in, grid, cfg, H_out=eye).weight, solve(W, H_in, grid, cfg).weight)


@pytest.mark.parametrize("r0,r1", [(0, 1), (0, 3), (2, 5), (5, 7)])
def test_block_compensation_is_the_exact_minimiser(r0, r1):
    R, C = 7, 4
    H_out, H_in = spd(R, 3, batch=1), spd(C, 4)
    E = torch.randn(1, r1 - r0, C)
    M = row_compensation(inverse_cholesky_upper(H_out), r0, r1)
    ours = M @ E                                                # update of rows r1: (their delta)
    # brute force: minimise vec(D)^T (H_out (x) H_in) vec(D) over rows r1: with rows r0:r1 at -E, rows < r0 at 0
    K = torch.kron(H_out[0, r0:, r0:], H_in).double()
    nb = (r1 - r0) * C
    fixed = (-E).reshape(-1).double()
    rest = torch.linalg.solve(K[nb:, nb:], -K[nb:, :nb] @ fixed)   # gradient zero over the free rows
    assert torch.allclose(ours.reshape(-1).double(), rest, atol=1e-4)


@pytest.mark.parametrize("seed", range(8))
def test_boa_loss_not_above_gptq_on_the_kronecker_objective(seed):
    W, H_in, H_out = problem(seed)
    grid = GridConfig(bits=3, group_size=8)
    shaped = lambda Q: (Q - W).reshape(3, 8, 16)
    boa = solve(W, H_in, grid, SolverConfig(rows_per_step=1, grid_at_start=True), H_out=H_out)
    gptq = solve(W, H_in, grid, SolverConfig(grid_at_start=True))
    assert boa.loss == pytest.approx(float(kronecker_loss(shaped(boa.weight), H_in, H_out)), rel=1e-4)
    assert boa.loss <= float(kronecker_loss(shaped(gptq.weight), H_in, H_out))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("with_out", [True, False])
def test_refinement_never_increases_the_loss(seed, with_out):
    W, H_in, H_out = problem(seed)
    grid = GridConfig(bits=2, group_size=8)
    res = solve(W, H_in, grid, SolverConfig(rows_per_step=2), H_out=H_out if with_out else None)
    B = 3
    Wb, codes = W.reshape(B, 8, 16), res.codes.float().reshape(B, 8, 16)
    scale, zero = res.scale.reshape(B, 8, 2), res.zero.reshape(B, 8, 2)
    Hd = damped(H_in, 0.01).expand(B, 16, 16)
    Ho = damped(H_out, 0.01) if with_out else None

    def loss(s):
        W_hat = (codes - expand_groups(zero, 16)) * expand_groups(s, 16)
        return float(kronecker_loss(W_hat - Wb, Hd, Ho))

    losses = [loss(scale)]
    for sweeps in (1, 2, 4):
        losses.append(loss(refine_scales(codes, scale, zero, Wb, Hd, Ho, 8, sweeps)))
    assert all(b <= a * (1 + 1e-5) for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("d_head", [5, 8, 19])
def test_refinement_is_row_by_row_coordinate_descent(d_head):
    """The sweep's products taken a block of rows at a time give the scales of the plain row-by-row
    descent, which recomputes every row's coupling from the whole error."""
    B, C, gw = 2, 12, 4
    G = C // gw
    g = torch.Generator().manual_seed(d_head)
    W = torch.randn(B, d_head, C, generator=g)
    codes = torch.randint(0, 4, (B, d_head, C), generator=g).float()
    zero = torch.full((B, d_head, G), 1.5)
    scale = torch.rand(B, d_head, G, generator=g) + 0.5
    H_in, H_out = spd(C, d_head, batch=B), spd(d_head, d_head + 1, batch=B)

    centred = codes - expand_groups(zero, C)
    want = scale.clone()
    for _ in range(2):
        for r in range(d_head):
            dW = centred * expand_groups(want, C) - W
            h = H_out[:, r, r]
            target = h[:, None] * W[:, r] - (torch.einsum("bk,bkc->bc", H_out[:, r], dW) - h[:, None] * dW[:, r])
            Br = torch.zeros(B, G, C)          # the row's centred codes placed in its groups
            for j in range(G):
                Br[:, j, j * gw:(j + 1) * gw] = centred[:, r, j * gw:(j + 1) * gw]
            lhs = h[:, None, None] * Br @ H_in @ Br.transpose(1, 2)
            new = torch.linalg.solve(lhs, (Br @ H_in @ target.unsqueeze(-1))).squeeze(-1)
            ok = (new > 0).all(-1, keepdim=True)
            want[:, r] = torch.where(ok, new, want[:, r])
    got = refine_scales(codes, scale, zero, W, H_in, H_out, gw, 2)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_turboboa_options_beat_boa_on_random_problems():
    wins = 0
    for seed in range(6):
        W, H_in, H_out = problem(seed)
        grid = GridConfig(bits=2, group_size=8)
        boa = solve(W, H_in, grid, SolverConfig(rows_per_step=1, grid_at_start=True), H_out=H_out).loss
        turbo = solve(W, H_in, grid, SolverConfig(rows_per_step=4, refine_iters=2), H_out=H_out).loss
        wins += turbo < boa
    assert wins >= 4


def test_dx_target_is_the_least_squares_optimum():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 50, generator=g)
    Xq = X + 0.1 * torch.randn(6, 50, generator=g)        # inputs seen by the quantized model
    W = torch.randn(4, 6, generator=g)
    H = Xq @ Xq.T
    cross = (X - Xq) @ Xq.T
    target = dx_corrected_target(W.unsqueeze(0), H.unsqueeze(0), cross, 1.0)[0]
    lstsq = torch.linalg.lstsq(Xq.T.double(), (W @ X).T.double()).solution.T
    assert torch.allclose(target.double(), lstsq, atol=1e-4)


@pytest.mark.parametrize("with_out", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_more_passes_never_raise_the_objective_and_often_lower_it(with_out, act_order):
    """Each pass re-solves the codes on the refined grids and is kept only if the damped objective falls."""
    lower = 0
    for seed in range(6):
        W, H_in, H_out = problem(seed)
        grid = GridConfig(bits=2, group_size=8, search="mse")
        Ho = H_out if with_out else None
        cfg = SolverConfig(rows_per_step=4, refine_iters=2, act_order=act_order)
        losses = []
        for passes in (1, 2, 4):
            res = solve(W, H_in, grid, dataclasses.replace(cfg, passes=passes), H_out=Ho)
            W_hat = res.weight.reshape(3, 8, 16)
            losses.append(float(kronecker_loss(W_hat - W.reshape(3, 8, 16), damped(H_in, 0.01).expand(3, 16, 16),
                                               None if Ho is None else damped(Ho, 0.01))))
            assert res.codes.max() <= grid.maxq
        assert losses[1] <= losses[0] * (1 + 1e-6) and losses[2] <= losses[1] * (1 + 1e-6)
        lower += losses[2] < losses[0] * (1 - 1e-4)
    assert lower >= 1


def test_one_pass_is_the_solver_without_passes():
    W, H_in, H_out = problem(1)
    grid = GridConfig(bits=3, group_size=8, search="mse")
    cfg = SolverConfig(rows_per_step=4, refine_iters=2, act_order=True)
    a = solve(W, H_in, grid, cfg, H_out=H_out)
    b = solve(W, H_in, grid, dataclasses.replace(cfg, passes=1), H_out=H_out)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and "passes_loss" not in a.extra
