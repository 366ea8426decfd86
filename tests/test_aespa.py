import pytest
import torch

import workbench
from workbench.methods.aespa import MomentLoss, aespa_solve
from workbench.methods.learned import LearnedOptions
from workbench.attention_hessians import AttentionHessians
from workbench.errors import WorkbenchError
from workbench.models.base import AttentionGeometry, attention_probs
from workbench.quant.grid import GridConfig, rtn
from workbench.quant.rounding import LearnedRounding
from workbench.quant.solver import SolverConfig, solve

SMALL = dict(calib_samples=4, seqlen=32, eval_windows=2, batch_size=2, device="cpu")


def random_attention(b=3, L=6, d_in=12, n_heads=4, n_kv=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, d_in, generator=g)
    q = torch.randn(b, n_heads, L, d, generator=g)
    k = torch.randn(b, n_kv, L, d, generator=g)
    return x, q, k, AttentionGeometry(n_heads, n_kv, d)


def correlated(d_out=16, d_in=32, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g)
    x = torch.randn(d_in, d_in, generator=g) @ torch.randn(d_in, n, generator=g)
    return w, 2 * x @ x.T / n


def test_value_moment_loss_equals_the_head_output_error():
    x, q, k, geo = random_attention()
    d_in, scaling = x.shape[-1], 0.5
    acc = AttentionHessians(geo, x.shape[1], d_in, "cpu")
    acc.add(x, q, k, scaling)
    H_v = acc.finish(None, None)["v"]["H_in"]                     # [n_kv, d_in, d_in], scaled 2 / tokens
    dW = torch.randn(geo.n_kv_heads * geo.head_dim, d_in, generator=torch.Generator().manual_seed(1))
    A = attention_probs(q, k, scaling)                             # [b, n_heads, L, L]
    direct = 0.0
    for h in range(geo.n_heads):
        g = h // geo.group                                         # the query head's KV head
        dv = x @ dW[g * geo.head_dim:(g + 1) * geo.head_dim].T     # [b, L, d]: dW_V X per position
        direct += float((A[:, h] @ dv).pow(2).sum())               # ||dW_V X A^T||^2
    tokens = x.shape[0] * x.shape[1]
    dW3 = dW.reshape(geo.n_kv_heads, geo.head_dim, d_in)
    from_moment = float(((dW3 @ H_v) * dW3).sum()) * tokens / 2
    assert from_moment == pytest.approx(direct, rel=1e-4)
    # the same, through aespa's relative loss closure
    W = torch.randn_like(dW)
    loss = MomentLoss(W, H_v)
    norm = float(((W.reshape(dW3.shape) @ H_v) * W.reshape(dW3.shape)).sum())
    assert float(loss(W + dW)) * norm * tokens / 2 == pytest.approx(direct, rel=1e-4)


def test_query_moment_loss_equals_the_logit_error_for_a_repeated_input():
    """With the same input at every position the Kronecker relaxation of the logit error is exact:
    ``tr(H_out dW H_in dW^T) = 2 / n * sum_t sum_{s <= t} (dq_t . k_s)^2`` (no RoPE)."""
    x, q, k, geo = random_attention(b=1, L=7, n_kv=2)
    x = x[:, :1].expand_as(x).contiguous()
    acc = AttentionHessians(geo, x.shape[1], x.shape[-1], "cpu")
    acc.add(x, q, k, 1.0)
    H_q = acc.finish(None, None)["q"]["H_out"]                     # [n_heads, d, d]
    dW = torch.randn(geo.n_heads * geo.head_dim, x.shape[-1], generator=torch.Generator().manual_seed(2))
    L = x.shape[1]
    causal = torch.ones(L, L).tril()
    direct = 0.0
    for h in range(geo.n_heads):
        dq = x @ dW[h * geo.head_dim:(h + 1) * geo.head_dim].T     # [b, L, d]
        dS = dq @ k[:, h // geo.group].transpose(-1, -2)           # first-order logit error [b, t, s]
        direct += float((dS * causal).pow(2).sum())
    x2 = x.reshape(-1, x.shape[-1])
    H_in = 2 * x2.T @ x2 / L
    W = torch.randn_like(dW)
    W3 = W.reshape(geo.n_heads, geo.head_dim, -1)
    norm = float(((H_q @ W3 @ H_in) * W3).sum())
    moment = float(MomentLoss(W, H_in, H_q)(W + dW)) * norm
    assert moment == pytest.approx(2 / L * direct, rel=1e-4)


def test_learned_rounding_starts_at_given_codes():
    w, h = correlated()
    grid = GridConfig(bits=3, group_size=16)
    start = solve(w, h, grid, SolverConfig())
    r = LearnedRounding(w, grid, scale=start.scale, zero=start.zero, codes=start.codes)
    torch.testing.assert_close(r(hard=True), start.weight, rtol=0, atol=1e-5)
    torch.testing.assert_close(r(hard=False), start.weight, rtol=0, atol=0.1 * float(start.scale.max()))


@pytest.mark.parametrize("init", ["rtn", "gptq", "boa"])
@pytest.mark.parametrize("seed", [0, 1])
def test_aespa_ends_on_grid_and_beats_rtn(init, seed):
    w, h = correlated(seed=seed)
    grid = GridConfig(bits=3, group_size=16)
    g = torch.Generator().manual_seed(seed + 10)
    a = torch.randn(4, 4, generator=g)
    stats = {"H_out": (a @ a.T + 0.5 * torch.eye(4)).expand(4, 4, 4).contiguous()}   # 4 heads of 4 rows
    res = aespa_solve(w, h, stats, grid, SolverConfig(rows_per_step=1, grid_at_start=True),
                      LearnedOptions(iters=300, lr=5e-2, init=init))
    # on the grid: weight == scale * (codes - zero)
    width = 16
    scale = res.scale.repeat_interleave(width, 1)
    zero = res.zero.repeat_interleave(width, 1)
    torch.testing.assert_close(res.weight, scale * (res.codes.float() - zero), rtol=0, atol=1e-5)
    assert int(res.codes.max()) <= grid.maxq
    dW = (rtn(w, grid) - w).reshape(4, 4, -1)
    rtn_loss = float(((stats["H_out"] @ dW @ h) * dW).sum())
    assert res.loss < 0.8 * rtn_loss
    assert res.extra["loss_after"] <= res.extra["loss_before"] or res.extra["kept"] == "start"
    assert res.extra["iters"] == 300 and res.extra["opt_seconds"] > 0


def test_options_are_checked():
    with pytest.raises(WorkbenchError, match="init"):
        LearnedOptions(init="nearest")
    with pytest.raises(WorkbenchError, match="iterations"):
        LearnedOptions(iters=0)
    with pytest.raises(WorkbenchError, match="--iters applies to aespa, brecq, not gptq"):
        workbench.quantize(method="gptq", iters=10)
    with pytest.raises(WorkbenchError, match="--init applies to aespa, not brecq"):
        workbench.quantize(method="brecq", init="gptq")


@pytest.mark.parametrize("method,init", [("aespa", "rtn"), ("aespa", "boa"), ("brecq", None)])
def test_learned_methods_end_to_end(tiny_checkpoints, method, init):
    over = {} if init is None else {"init": init}
    events = []
    res = workbench.quantize(model=tiny_checkpoints["llama"], method=method, bits=3, group_size=16,
                             iters=40, on_event=events.append, **over, **SMALL)
    rep = res.report
    assert len(rep.layers) == 2 * 7 and rep.ppl_quant is not None
    finished = [e for e in events if e.kind == "layer_finished"]
    engine_events = [e for e in events if e.kind not in ("phase", "progress")]   # loading and perplexity bars
    assert len(finished) == 14 and engine_events[-1].kind == "done"
    for rec in rep.layers:
        assert rec.extra["iters"] == 40
        if method == "aespa":
            assert {"loss_before", "loss_after", "opt_seconds"} <= set(rec.extra)
            assert rec.extra["loss_after"] <= rec.extra["loss_before"] * 1.0001 or rec.extra["kept"] == "start"
        else:
            assert {"block_loss_before", "block_loss_after", "block_seconds"} <= set(rec.extra)
        assert rec.rel_error < 1.0
    # the weights are on their packed grids
    layer = res.model.model.layers[0].self_attn.q_proj
    packed = res.packed["model.layers.0.self_attn.q_proj"]
    scale = packed.scale.repeat_interleave(16, 1)
    zero = packed.zero.repeat_interleave(16, 1)
    torch.testing.assert_close(layer.weight.data, scale * (packed.codes.float() - zero), rtol=0, atol=1e-5)
    if method == "brecq":
        assert rep.layers[0].extra["block_loss_after"] < rep.layers[0].extra["block_loss_before"]


def test_brecq_on_opt_swaps_top_level_linears_back(tiny_checkpoints):
    res = workbench.quantize(model=tiny_checkpoints["opt"], method="brecq", bits=4, group_size=16, iters=10,
                             max_blocks=1, **SMALL)
    block = res.model.model.decoder.layers[0]
    assert type(block.fc1) is torch.nn.Linear and type(block.self_attn.q_proj) is torch.nn.Linear
    assert all(p.requires_grad for p in block.parameters())
    assert [r.kind for r in res.report.layers] == ["q", "k", "v", "o", "fc1", "fc2"]


@pytest.mark.parametrize("heads", [None, 3])
def test_moment_loss_closed_form_gradient_equals_autograd_of_the_kronecker_loss(heads):
    from workbench.quant.solver import kronecker_loss
    W, H_in = correlated(d_out=6, d_in=8, n=64, seed=3)
    H_out = None
    if heads:
        a = torch.randn(heads, 2, 2, generator=torch.Generator().manual_seed(4))
        H_out = a @ a.transpose(-1, -2) + torch.eye(2)
    W_hat = (W + 0.1 * torch.randn(W.shape, generator=torch.Generator().manual_seed(5))).requires_grad_()
    loss = MomentLoss(W, H_in, H_out)
    value, grad = loss.value_and_grad(W_hat.detach() - W)
    assert grad.shape == W_hat.shape
    W3 = W.reshape(heads or 1, -1, W.shape[1])
    norm = kronecker_loss(W3, H_in, H_out)
    direct = kronecker_loss(W_hat.reshape(W3.shape) - W3, H_in, H_out) / norm
    direct.backward()
    assert float(value) == pytest.approx(float(direct.detach()), rel=1e-5)
    assert torch.allclose(grad, W_hat.grad, rtol=1e-4, atol=1e-6)
    W_hat.grad = None
    loss(W_hat).backward()          # and the autograd form agrees
    assert torch.allclose(grad, W_hat.grad, rtol=1e-4, atol=1e-6)


def test_moment_loss_updates_its_product_by_sparse_changes():
    """Steps that change few weights update the remembered product by the change (sparse); every
    step's value and gradient equal those of a fresh loss, and a dense change recomputes it."""
    from workbench.methods import aespa
    W, H_in = correlated(d_out=40, d_in=24, n=128, seed=6)
    g = torch.Generator().manual_seed(7)
    loss = MomentLoss(W, H_in)
    assert loss.incremental
    dW = 0.1 * torch.randn(W.shape, generator=g)
    modes = []
    for step in range(aespa.SPARSE_UPDATES_BEFORE_REFRESH + 6):
        if step == 3:
            dW = dW + 0.01 * torch.randn(W.shape, generator=g)          # every weight moves
        elif step > 0:
            dW = dW.clone()
            idx = torch.randint(0, W.numel(), (20,), generator=g)        # 2% of the weights move
            dW.view(-1)[idx] += 0.05 * torch.randn(20, generator=g)
        before = loss._sparse_updates
        value, grad = loss.value_and_grad(dW)
        modes.append("sparse" if loss._sparse_updates > before else "full")
        fresh_value, fresh_grad = MomentLoss(W, H_in).value_and_grad(dW)
        torch.testing.assert_close(grad, fresh_grad, rtol=1e-5, atol=1e-6)
        assert float(value) == pytest.approx(float(fresh_value), rel=1e-5)
    assert modes[:5] == ["full", "sparse", "sparse", "full", "sparse"]
    assert modes.count("full") == 3        # the first, the dense change, the refresh
    assert not MomentLoss(W, H_in.expand(4, 24, 24).contiguous()).incremental     # per-head factors


@pytest.mark.parametrize("heads", [None, 3])
def test_closed_form_steps_follow_the_autograd_ones(heads, monkeypatch):
    """aespa's steps (closed-form gradient, the kernel writing W_hat - W, sparse product updates)
    walk the same path as autograd through the same loss."""
    from workbench.quant.rounding import LearnedRounding, RoundingConfig, optimize_rounding
    W, H_in = correlated(d_out=12, d_in=16, n=64, seed=8)
    H_out = None
    if heads:
        a = torch.randn(heads, 4, 4, generator=torch.Generator().manual_seed(9))
        H_out = a @ a.transpose(-1, -2) + torch.eye(4)
    grid = GridConfig(bits=2, group_size=8)
    cfg = RoundingConfig(iters=200, lr=0.05, warmup=0.2, reg_weight=0.05)   # long enough to settle
    fast, slow = LearnedRounding(W, grid), LearnedRounding(W, grid)
    loss_fast, loss_slow = MomentLoss(W, H_in, H_out), MomentLoss(W, H_in, H_out)
    from workbench.methods import aespa
    sparse_updates = []
    as_csr = aespa._as_csr
    monkeypatch.setattr(aespa, "_as_csr", lambda m: sparse_updates.append(1) or as_csr(m))
    hist_fast = optimize_rounding([fast], lambda: loss_fast(fast()), cfg, closed_form=[loss_fast])
    hist_slow = optimize_rounding([slow], lambda: loss_slow(slow()), cfg)
    torch.testing.assert_close(fast.v, slow.v, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(hist_fast.loss), torch.tensor(hist_slow.loss), rtol=1e-4, atol=1e-6)
    assert hist_fast.final_loss == pytest.approx(hist_slow.final_loss, rel=1e-5)
    # once the regularizer settles the roundings, the plain loss takes sparse updates; per-head never
    assert (len(sparse_updates) > 0) if heads is None else not sparse_updates
