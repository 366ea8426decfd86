"""LLaMA-style decoders: Llama, SmolLM2, Qwen2, Mistral (RoPE, grouped-query attention)."""
from __future__ import annotations

from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .base import AttentionGeometry, Family, ResidualLayout, Stage, attend, split_heads


def geometry(config) -> AttentionGeometry:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return AttentionGeometry(heads, getattr(config, "num_key_value_heads", None) or heads, head_dim)


def context(model, hidden):
    import torch
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    return model.model.rotary_emb(hidden, positions)


def qkv(attn, x, rotary):
    d = attn.head_dim
    q, k, v = (split_heads(proj(x), d) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    cos, sin = rotary
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def block_forward(block, h, rotary):
    attn, mlp = block.self_attn, block.mlp
    x = block.input_layernorm(h)
    yield Stage(("q", "k", "v"), x)
    a = attend(*qkv(attn, x, rotary), attn.scaling)
    yield Stage(("o",), a)
    h = h + attn.o_proj(a)
    x = block.post_attention_layernorm(h)
    yield Stage(("gate", "up"), x)
    m = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    yield Stage(("down",), m)
    return h + mlp.down_proj(m)


LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    blocks_path="model.layers",
    attention_path="self_attn",
    linears={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    block_forward=block_forward,
    qkv=qkv,
    context=context,
    geometry=geometry,
    final_modules=("model.norm",),
    fused=(("q", "k", "v"), ("gate", "up")),
    residual=ResidualLayout(embedding="model.embed_tokens", head="lm_head", final_norm="model.norm",
                            norms=(("input_layernorm", ("q", "k", "v")), ("post_attention_layernorm", ("gate", "up"))),
                            writers=("o", "down")),
)
