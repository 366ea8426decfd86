"""Attention-aware Hessians against an explicit double sum over positions on tiny random models."""
import pytest
import torch

import workbench
from tests.conftest import tiny_llama, tiny_opt
from workbench.attention_hessians import AttentionHessians
from workbench.models import family_for
from workbench.models.base import attention_probs, split_heads


def rotation(cos_t, sin_t):
    d = cos_t.numel()
    h = d // 2
    J = torch.zeros(d, d)
    J[:h, h:] = -torch.eye(h)
    J[h:, :h] = torch.eye(h)
    return torch.diag(cos_t) + torch.diag(sin_t) @ J


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt])
@torch.no_grad()
def test_factors_match_explicit_sums(build):
    model = build(seed=1)
    family = family_for(model.config)
    geo = family.geometry(model.config)
    block = family.blocks(model)[0]
    attn = family.attention(block)
    b, L, d = 2, 6, geo.head_dim
    x = torch.randn(b, L, model.config.hidden_size)
    ctx = family.context(model, x)
    q, k, _ = family.qkv(attn, x, ctx)
    acc = AttentionHessians(geo, L, x.shape[-1], "cpu", value_output="o_proj")
    acc.add(x, q, k, attn.scaling)
    cos, sin = (None, None) if ctx is None else (ctx[0][0], ctx[1][0])
    got = acc.finish(cos, sin, family.linear(block, "o").weight)
    if cos is None:
        cos, sin = torch.ones(L, d), torch.zeros(L, d)
    R = [rotation(cos[t], sin[t]) for t in range(L)]
    if ctx is not None:   # the explicit rotation is RoPE's
        raw_q = split_heads(attn.q_proj(x), d)
        assert torch.allclose(q[0, 0, 3], R[3] @ raw_q[0, 0, 3], atol=1e-5)
    n = b * L
    for h in range(geo.n_heads):
        g = h // geo.group
        H = sum(torch.outer(R[t].T @ k[i, g, s], R[t].T @ k[i, g, s])
                for i in range(b) for t in range(L) for s in range(t + 1)) / n
        assert torch.allclose(got["q"]["H_out"][h], H, rtol=1e-4, atol=1e-4)
    A = attention_probs(q, k, attn.scaling)
    Wo = family.linear(block, "o").weight
    for g in range(geo.n_kv_heads):
        heads = range(g * geo.group, (g + 1) * geo.group)
        H = sum(torch.outer(R[s].T @ q[i, h, t], R[s].T @ q[i, h, t])
                for h in heads for i in range(b) for s in range(L) for t in range(s, L)) / n
        assert torch.allclose(got["k"]["H_out"][g], H, rtol=1e-4, atol=1e-4)
        Hv = sum((A[i, h] @ x[i]).T @ (A[i, h] @ x[i]) for h in heads for i in range(b)) * 2 / n
        assert torch.allclose(got["v"]["H_in"][g], Hv, rtol=1e-4, atol=1e-4)
        Ho = sum(Wo[:, h * d:(h + 1) * d].T @ Wo[:, h * d:(h + 1) * d] for h in heads) / geo.group
        assert torch.allclose(got["v"]["H_out"][g], Ho, rtol=1e-4, atol=1e-5)
    assert got["q"]["H_out"].shape == (geo.n_heads, d, d)
    assert got["v"]["H_in"].shape == (geo.n_kv_heads, x.shape[-1], x.shape[-1])


SMALL = dict(calib_samples=4, seqlen=64, eval_windows=2, batch_size=2, device="cpu", bits=3, group_size=16)


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("method", ["boa", "turboboa"])
def test_attention_aware_methods_run_and_report_attention_error(tiny_checkpoints, arch, method):
    rep = workbench.quantize(model=tiny_checkpoints[arch], method=method, **SMALL).report
    df = rep.to_frame()
    qkv = df[df.kind.isin(["q", "k", "v"])]
    assert qkv["attn_rel_error"].between(0, 1).all() and (qkv["attn_rel_error"] > 0).all()
    assert df[~df.kind.isin(["q", "k", "v"])]["attn_rel_error"].isna().all()
    assert rep.config["solver"]["rows_per_step"] == (1 if method == "boa" else 8)
    assert rep.ppl_quant < 2 * rep.ppl_fp


def test_boa_attention_error_below_gptq_on_tiny_llama(tiny_checkpoints):
    err = {}
    same_grid = dict(act_order=False, grid_search="minmax", grid_at_start=True)   # only the Hessians differ
    for method in ("gptq", "boa"):
        df = workbench.quantize(model=tiny_checkpoints["llama"], method=method,
                                **{**SMALL, **same_grid, "bits": 2}).report.to_frame()
        err[method] = df[df.kind.isin(["q", "k"])]["attn_rel_error"].mean()
    assert err["boa"] < err["gptq"]


@pytest.mark.parametrize("L,chunks,group", [(7, 3, 3), (16, 16, 1), (5, 8, 2), (9, 1, 2)])
def test_probs_gram_equals_the_sum_of_the_heads_products(L, chunks, group):
    from workbench.attention_hessians import probs_gram
    g = torch.Generator().manual_seed(L)
    A = torch.randn(2, 2 * group, L, L, generator=g).tril()
    want = torch.stack([sum(A[:, h].transpose(-1, -2) @ A[:, h] for h in range(kv * group, (kv + 1) * group))
                        for kv in range(2)], dim=1)
    out = torch.full((2, 2, L, L), float("nan"))      # a reused buffer's old contents must not leak in
    got = probs_gram(A, group, chunks, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.allclose(got, want, atol=1e-5)


@torch.no_grad()
def test_position_moments_do_not_depend_on_the_batches():
    """The moments of float32 queries and keys are summed in float64 with exact products, so one
    batch of 4 and 4 batches of 1 (or 2 ranks of 2) agree to float64 rounding, which keeps a
    data-parallel run's codes those of one process."""
    model = tiny_llama(seed=3)
    family = family_for(model.config)
    geo = family.geometry(model.config)
    attn = family.attention(family.blocks(model)[0])
    x = torch.randn(4, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 30
    ctx = family.context(model, x)
    q, k, _ = family.qkv(attn, x, ctx)
    whole, split = (AttentionHessians(geo, 8, x.shape[-1], "cpu") for _ in range(2))
    whole.add(x, q, k, attn.scaling)
    for i in range(4):
        split.add(x[i:i + 1], q[i:i + 1], k[i:i + 1], attn.scaling)
    for G1, G2 in ((whole.G_keys, split.G_keys), (whole.G_queries, split.G_queries)):
        assert torch.allclose(G1, G2, rtol=1e-13, atol=0)
