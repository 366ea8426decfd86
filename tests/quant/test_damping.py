"""A Hessian that does not factor is retried with more damping; what is not finite stops the run by name."""
import json

import pytest
import torch

from tests.conftest import tiny_llama
from workbench.cli import main
from workbench.quant.grid import GridConfig
from workbench.quant.solver import DAMP_LIMIT, SolverConfig, SolverError, damping_steps, solve

GRID = GridConfig(bits=4, group_size=16)


def test_damping_steps_go_up_tenfold_to_the_limit():
    assert damping_steps(0.01) == pytest.approx([0.01, 0.1, 1.0])
    assert damping_steps(0.0) == pytest.approx([0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    assert damping_steps(0.5) == pytest.approx([0.5, DAMP_LIMIT])


def singular_hessian(n=32, rank=2):
    X = torch.randn(rank, n, generator=torch.Generator().manual_seed(0))
    return X.T @ X          # rank 2: positive semi-definite, not definite


def test_a_singular_hessian_is_solved_with_more_damping_and_the_damping_is_recorded():
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    H = singular_hessian()
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(H)
    res = solve(W, H, GRID, SolverConfig(damp=0.0))
    assert res.extra["damp"] > 0
    assert torch.isfinite(res.weight).all()
    # a Hessian that factors keeps the damping asked for
    ok = solve(W, H + torch.eye(32), GRID, SolverConfig(damp=0.01))
    assert ok.extra["damp"] == 0.01


def test_an_output_hessian_is_retried_too():
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    H_out = singular_hessian(4, 1).expand(2, 4, 4).clone()
    res = solve(W, torch.eye(32), GRID, SolverConfig(damp=0.0), H_out=H_out)
    assert res.extra["damp"] == 0.0 and res.extra["damp_out"] > 0


@pytest.mark.parametrize("where", ["weight", "hessian"])
def test_what_is_not_finite_is_named(where):
    W = torch.randn(8, 32)
    H = torch.eye(32)
    (W if where == "weight" else H)[0, 0] = float("nan")
    with pytest.raises(SolverError, match="not finite"):
        solve(W, H, GRID, SolverConfig())


FAST = ["--eval-windows", "-1", "--quiet", "--device", "cpu", "--group-size", "16", "--max-blocks", "1"]


def test_damp_zero_on_one_short_window_finishes_and_reports_the_damping(tiny_checkpoints, tmp_path, capsys):
    report = tmp_path / "r.json"
    code = main(["quantize", "--model", tiny_checkpoints["llama"], "--damp", "0", "--calib-samples", "1",
                 "--seqlen", "4", "--report", str(report), *FAST])
    assert code == 0, capsys.readouterr().err
    layers = json.loads(report.read_text())["layers"]
    assert layers and all(0 < r["extra"]["damp"] <= DAMP_LIMIT for r in layers)


@pytest.mark.parametrize("poison,needle", [
    (lambda m: m.model.layers[0].self_attn.k_proj.weight.data.__setitem__((0, 0), float("nan")),
     "model.layers.0.self_attn.k_proj: the weight has entries that are not finite"),
    (lambda m: m.model.layers[0].input_layernorm.weight.data.__setitem__(0, float("inf")),
     "model.layers.0.self_attn.q_proj: the calibration activations reaching this layer are not finite"),
])
def test_non_finite_weights_or_activations_stop_with_the_layer_named(tokenizer, tmp_path, capsys, poison, needle):
    model = tiny_llama()
    poison(model)
    d = tmp_path / "model"
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    report = tmp_path / "r.json"
    code = main(["quantize", "--model", str(d), "--calib-samples", "2", "--seqlen", "32", "--report", str(report),
                 *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not report.exists()


@pytest.mark.parametrize("act_order", [False, True])
def test_each_hessian_is_factored_once(monkeypatch, act_order):
    """The factorization that tests the damping is the one the column loop takes."""
    from workbench.quant import solver
    calls = []
    real = solver.inverse_cholesky_upper
    monkeypatch.setattr(solver, "inverse_cholesky_upper", lambda H: calls.append(H.shape) or real(H))
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    H = singular_hessian() + torch.eye(32)
    solve(W, H, GRID, SolverConfig(act_order=act_order))
    assert calls == [(1, 32, 32)]
    calls.clear()
    solve(W, H, GRID, SolverConfig(act_order=act_order), H_out=torch.eye(4).expand(2, 4, 4).clone())
    assert calls == [(1, 32, 32), (2, 4, 4)]


def test_inverse_cholesky_upper_is_the_textbook_factor_batched_and_not():
    from workbench.quant.solver import inverse_cholesky_upper
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 40, 160, generator=g, dtype=torch.float64)
    H = X @ X.transpose(1, 2) / 160 + 1e-3 * torch.eye(40, dtype=torch.float64)
    U = inverse_cholesky_upper(H)
    textbook = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    torch.testing.assert_close(U, textbook, rtol=1e-9, atol=1e-9)
    assert torch.equal(U, U.triu()) and bool((U.diagonal(dim1=1, dim2=2) > 0).all())
    torch.testing.assert_close(U.transpose(1, 2) @ U, torch.linalg.inv(H), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(inverse_cholesky_upper(H[1]), U[1], rtol=0, atol=0)
