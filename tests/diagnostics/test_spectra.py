"""Spectra against direct eigendecompositions of explicitly built Hessians, on tiny random models."""
import math

import pytest
import torch

from tests.conftest import tiny_llama, tiny_opt
from workbench.attention_hessians import AttentionHessians
from workbench.diagnostics import eigenvalues, hessian_spectra, spectrum_stats
from workbench.models import family_for


def test_eigenvalues_match_eigvalsh():
    torch.manual_seed(0)
    X = torch.randn(200, 24)
    H = X.T @ X / 200
    got = eigenvalues(H)
    ref = torch.linalg.eigvalsh(H.double()).flip(0)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)
    assert got.dtype == torch.float64 and (got[:-1] >= got[1:]).all()


def test_summary_of_known_spectra():
    flat = spectrum_stats(torch.ones(64, dtype=torch.float64))
    assert flat["condition"] == pytest.approx(1.0) and flat["effective_rank"] == pytest.approx(64)
    assert flat["top1_share"] == pytest.approx(1 / 64) and flat["numerical_rank"] == 64
    one = spectrum_stats(torch.tensor([5.0] + [0.0] * 199, dtype=torch.float64), damp=0.01)
    assert one["effective_rank"] == pytest.approx(1.0) and one["top1_share"] == pytest.approx(1.0)
    assert one["condition"] == pytest.approx(1e15) and one["numerical_rank"] == 1
    # damping adds 1% of the mean eigenvalue to every eigenvalue
    delta = 0.01 * 5.0 / 200
    assert one["condition_damped"] == pytest.approx((5.0 + delta) / delta)
    two = spectrum_stats(torch.tensor([3.0, 1.0], dtype=torch.float64))
    p = torch.tensor([0.75, 0.25])
    assert two["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert two["condition"] == pytest.approx(3.0) and two["trace"] == pytest.approx(4.0)


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt])
@torch.no_grad()
def test_layer_and_head_spectra_match_explicit_hessians(build):
    model = build(seed=2)
    family = family_for(model.config)
    geo = family.geometry(model.config)
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    s = hessian_spectra(model, family, ids, batch_size=2)
    n_blocks = len(family.blocks(model))
    assert len(s.layers) == n_blocks * len(family.linears)
    assert list(s.layers["kind"][: len(family.linears)]) == list(family.linears)
    assert s.layers["name"].is_unique
    # block 0's q/k/v input, built by hand: the embeddings through the first block's input norm
    block = family.blocks(model)[0]
    if family.name == "llama":
        x = block.input_layernorm(model.model.embed_tokens(ids))
        ctx = model.model.rotary_emb(x, torch.arange(ids.shape[1])[None])
    else:
        pos = model.model.decoder.embed_positions(torch.ones_like(ids), 0)
        x = block.self_attn_layer_norm(model.model.decoder.embed_tokens(ids) + pos)
        ctx = None
    x2 = x.reshape(-1, x.shape[-1]).double()
    H = 2 * x2.T @ x2 / x2.shape[0]
    ref = torch.linalg.eigvalsh(H).flip(0).clamp_min(0)
    eigs = s.layer_eigenvalues
    got = torch.tensor(eigs[eigs["name"] == s.layers["name"][0]].sort_values("index")["eigenvalue"].values)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6 * float(ref[0]))
    # the k H_out of block 0 against AttentionHessians fed the same input directly
    acc = AttentionHessians(geo, ids.shape[1], x.shape[-1], "cpu")
    q, k, _ = family.qkv(family.attention(block), x, ctx)
    acc.add(x, q, k, family.attention(block).scaling)
    cos, sin = (None, None) if ctx is None else (ctx[0][0], ctx[1][0])
    Hk = acc.finish(cos, sin)["k"]["H_out"]
    heads = s.head_eigenvalues
    for g in range(geo.n_kv_heads):
        rows = heads[(heads["block"] == 0) & (heads["kind"] == "k") & (heads["head"] == g)]
        got = rows.sort_values("index")["eigenvalue"]
        ref = torch.linalg.eigvalsh(Hk[g].double()).flip(0).clamp_min(0)
        assert torch.allclose(torch.tensor(got.values), ref, rtol=1e-3, atol=1e-5 * float(ref[0]))
    counts = s.heads.groupby("kind").size().to_dict()
    assert counts == {"q": n_blocks * geo.n_heads, "k": n_blocks * geo.n_kv_heads, "v": n_blocks * geo.n_kv_heads}
    assert set(s.heads.query("kind == 'v'")["factor"]) == {"H_in"}


def test_max_blocks_and_no_heads():
    model = tiny_llama()
    family = family_for(model.config)
    ids = torch.randint(0, 512, (2, 8))
    s = hessian_spectra(model, family, ids, max_blocks=1, heads=False)
    assert set(s.layers["block"]) == {0} and len(s.heads) == 0
