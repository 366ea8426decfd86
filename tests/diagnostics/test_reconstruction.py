"""Reconstruction errors: zero for an unchanged copy, local to the changed layer, right shapes."""
import pytest
import torch

from tests.conftest import tiny_llama, tiny_opt
from workbench.diagnostics import frozen_copy, reconstruction_errors
from workbench.errors import WorkbenchError
from workbench.models import family_for
from workbench.models.base import attend

IDS = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt])
def test_unquantized_copy_has_exactly_zero_error(build):
    model = build()
    family = family_for(model.config)
    geo = family.geometry(model.config)
    r = reconstruction_errors(model, frozen_copy(model), family, IDS, batch_size=2)
    n_blocks = len(family.blocks(model))
    assert len(r.layers) == n_blocks * len(family.linears)
    assert len(r.heads) == n_blocks * geo.n_heads                     # one row per block and query head
    assert sorted(r.heads["head"].unique()) == list(range(geo.n_heads))
    assert len(r.blocks) == n_blocks
    for frame in (r.layers, r.heads, r.blocks):
        values = frame.drop(columns=[c for c in ("name", "block", "kind", "head") if c in frame]).to_numpy()
        assert (values == 0).all()


@torch.no_grad()
def test_errors_stay_where_the_weights_changed():
    model = tiny_llama()
    family = family_for(model.config)
    quant = frozen_copy(model)
    v = family.linear(family.blocks(quant)[1], "v")
    v.weight.add_(0.05 * torch.randn_like(v.weight))
    r = reconstruction_errors(model, quant, family, IDS, batch_size=2)
    err = r.layers.drop(columns="name").set_index(["block", "kind"])
    assert (err.loc[0].to_numpy() == 0).all()                         # block 0 is untouched
    assert err.loc[(1, "v"), "rel_error"] > 0 and err.loc[(1, "q"), "rel_error"] == 0
    assert (r.heads.query("block == 0")[["before_o", "after_o"]].to_numpy() == 0).all()
    assert (r.heads.query("block == 1")["before_o"] > 0).all()
    # the local v error is ||(W_q - W) x||^2 / ||W x||^2 on block 1's full-precision input
    h = model.model.embed_tokens(IDS)
    rot = model.model.rotary_emb(h, torch.arange(IDS.shape[1])[None])
    h1 = model.model.layers[0](h, position_embeddings=rot, attention_mask=None)
    h1 = h1[0] if isinstance(h1, tuple) else h1
    x = model.model.layers[1].input_layernorm(h1)
    W = family.linear(family.blocks(model)[1], "v").weight
    expected = float(((x @ (v.weight - W).T) ** 2).sum() / ((x @ W.T) ** 2).sum())
    assert err.loc[(1, "v"), "rel_error"] == pytest.approx(expected, rel=1e-4)
    # whole-block attention error before o_proj, recomputed by hand
    attn_fp, attn_q = model.model.layers[1].self_attn, quant.model.layers[1].self_attn
    ref = attend(*family.qkv(attn_fp, x, rot), attn_fp.scaling)
    out = attend(*family.qkv(attn_q, x, rot), attn_q.scaling)
    expected = float(((out - ref) ** 2).sum() / (ref ** 2).sum())
    assert r.blocks.set_index("block").loc[1, "before_o"] == pytest.approx(expected, rel=1e-4)


@torch.no_grad()
def test_propagated_error_carries_earlier_blocks():
    model = tiny_opt()
    family = family_for(model.config)
    quant = frozen_copy(model)
    fc2 = family.linear(family.blocks(quant)[0], "fc2")
    fc2.weight.add_(0.05 * torch.randn_like(fc2.weight))
    r = reconstruction_errors(model, quant, family, IDS, batch_size=2)
    b1 = r.layers.query("block == 1")
    assert (b1["rel_error"] == 0).all() and (b1["rel_error_propagated"] > 0).all()
    blocks = r.blocks.set_index("block")
    assert blocks.loc[1, "before_o"] == 0 and blocks.loc[1, "before_o_propagated"] > 0
    assert blocks.loc[0, "output_propagated"] > 0


def test_max_blocks_and_shape_mismatch():
    model = tiny_llama()
    family = family_for(model.config)
    r = reconstruction_errors(model, frozen_copy(model), family, IDS, max_blocks=1)
    assert set(r.layers["block"]) == {0} and set(r.heads["block"]) == {0}
    with pytest.raises(WorkbenchError, match="different shapes"):
        reconstruction_errors(model, tiny_llama(num_hidden_layers=1), family, IDS)
