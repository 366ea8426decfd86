import pytest
import torch

from tests.conftest import tiny_llama, tiny_opt
from workbench.errors import WorkbenchError
from workbench.models import family_for
from workbench.models.base import attend, attention_probs, repeat_kv


def run_stages(family, block, h, ctx):
    gen = family.block_forward(block, h, ctx)
    kinds = []
    try:
        while True:
            kinds.append(next(gen).kinds)
    except StopIteration as stop:
        return kinds, stop.value


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt])
@torch.no_grad()
def test_staged_block_matches_transformers(build):
    model = build()
    family = family_for(model.config)
    ids = torch.randint(0, 512, (2, 16))
    out = model(ids, output_hidden_states=True)
    hs = out.hidden_states
    ctx = family.context(model, hs[0])
    block = family.blocks(model)[0]
    kinds, y = run_stages(family, block, hs[0], ctx)
    assert [k for ks in kinds for k in ks] == list(family.linears)
    assert torch.allclose(y, hs[1], atol=1e-5)


def test_gqa_geometry_and_probabilities():
    model = tiny_llama()
    family = family_for(model.config)
    geo = family.geometry(model.config)
    assert (geo.n_heads, geo.n_kv_heads, geo.head_dim, geo.group) == (4, 2, 16, 2)
    block = family.blocks(model)[0]
    x = torch.randn(1, 8, 64)
    q, k, v = family.qkv(family.attention(block), x, family.context(model, x))
    assert q.shape == (1, 4, 8, 16) and k.shape == (1, 2, 8, 16)
    A = attention_probs(q, k, block.self_attn.scaling)
    assert torch.allclose(A.sum(-1), torch.ones(1, 4, 8))
    assert torch.all(A.triu(1) == 0)       # causal
    manual = (A @ repeat_kv(v, 2)).transpose(1, 2).reshape(1, 8, 64)
    assert torch.allclose(attend(q, k, v, block.self_attn.scaling), manual, atol=1e-5)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config
    with pytest.raises(WorkbenchError, match="supported model types: llama, mistral, qwen2, opt"):
        family_for(GPT2Config())
