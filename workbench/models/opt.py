"""OPT decoders: learned positions (no RoPE), one KV head per query head, biases."""
from __future__ import annotations

from .base import AttentionGeometry, Family, Stage, attend, split_heads


def geometry(config) -> AttentionGeometry:
    heads = config.num_attention_heads
    return AttentionGeometry(heads, heads, config.hidden_size // heads)


def context(model, hidden):
    return None


def qkv(attn, x, _ctx):
    d = attn.head_dim
    return tuple(split_heads(proj(x), d) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))


def block_forward(block, h, ctx):
    attn, pre = block.self_attn, block.do_layer_norm_before
    x = block.self_attn_layer_norm(h) if pre else h
    yield Stage(("q", "k", "v"), x)
    a = attend(*qkv(attn, x, ctx), attn.scaling)
    yield Stage(("o",), a)
    h = h + attn.out_proj(a)
    if not pre:
        h = block.self_attn_layer_norm(h)
    x = block.final_layer_norm(h) if pre else h
    yield Stage(("fc1",), x)
    m = block.activation_fn(block.fc1(x))
    yield Stage(("fc2",), m)
    h = h + block.fc2(m)
    return h if pre else block.final_layer_norm(h)


OPT = Family(
    name="opt",
    model_types=("opt",),
    blocks_path="model.decoder.layers",
    attention_path="self_attn",
    linears={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.out_proj", "fc1": "fc1", "fc2": "fc2"},
    block_forward=block_forward,
    qkv=qkv,
    context=context,
    geometry=geometry,
    final_modules=("model.decoder.final_layer_norm", "model.decoder.project_out"),
    not_rotatable="its LayerNorms subtract the mean and add a bias, which do not commute with a rotation of the "
                  "residual stream",
)
