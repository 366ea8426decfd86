"""Rotating a pre-norm decoder so that its activations have no outlier channels (QuaRot's recipe).

The residual stream is multiplied by an orthogonal Q: fused into the embedding, every linear that
reads the stream (W -> W Q, after the RMSNorm scales before it are folded in), every linear that
writes to it (W -> Qᵀ W) and the head. RMSNorm with unit scales commutes with Q, so in exact
arithmetic the model computes the same function. Two more rotations are applied online, to inputs
that are not the residual stream: a Hadamard transform before ``down_proj`` and before ``o_proj``
(their weights carry its transpose), and, offline, one per head over the head dimension between
the values and ``o_proj`` (which also spreads the values' outliers for a quantized KV cache).

Sizes without a Hadamard matrix from the constructions in ``quant.hadamard`` get a seeded random
orthogonal matrix; ``rotate_model`` returns which size got which.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import WorkbenchError
from .models.base import Family, get_path
from .quant.hadamard import Rotation, is_power_of_two, rotation
from .transformed import TransformedLinear

KINDS = ("none", "hadamard", "random")


def check_rotatable(family: Family, flag: str = "--rotate"):
    if family.residual is None:
        raise WorkbenchError(f"{flag} cannot rotate a {family.name} model: {family.not_rotatable}; use {flag} none")


def describe(rot: Rotation) -> str:
    p, m = rot.orders
    if rot.kind == "random":
        return "random orthogonal"
    return "hadamard (Sylvester)" if is_power_of_two(p) else f"hadamard {p}x{m}"


@torch.no_grad()
def rotate_model(model: nn.Module, family: Family, kind: str, seed: int = 0) -> dict:
    """Rotate ``model`` in place (its weights; its ``o``/``down`` linears get their online transform).

    Returns ``{"residual"|"mlp"|"attention"|"head_dim": "<size>: <how>"}``.
    """
    check_rotatable(family)
    layout = family.residual
    g = family.geometry(model.config)
    blocks = family.blocks(model)
    first = blocks[0]
    width = family.linear(first, layout.writers[0]).out_features
    Q = rotation(width, kind, seed)
    R_mlp = rotation(family.linear(first, layout.mlp_out).in_features, kind, seed + 1)
    R_attn = rotation(family.linear(first, layout.attention_out).in_features, kind, seed + 2)
    R_head = rotation(g.head_dim, kind, seed + 3)

    embedding, head = get_path(model, layout.embedding), get_path(model, layout.head)
    if head.weight is embedding.weight:    # tied: the head gets the final norm's scales, the embedding does not
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    _set(embedding, "weight", Q.apply(embedding.weight.double()))
    for block in blocks:
        for norm_path, readers in layout.norms:
            norm = get_path(block, norm_path)
            for kind_ in readers:
                _read_stream(family.linear(block, kind_), norm.weight, Q)
            norm.weight.fill_(1.0)
        for kind_ in layout.writers:
            _write_stream(family.linear(block, kind_), Q)
        _rotate_value_heads(family.linear(block, layout.value), R_head, g.head_dim)
        o = family.linear(block, layout.attention_out)
        _set(o, "weight", _heads_right(o.weight.double(), R_head, g.head_dim))
        for kind_, R in ((layout.attention_out, R_attn), (layout.mlp_out, R_mlp)):
            layer = TransformedLinear.of(family.linear(block, kind_))
            _set(layer, "weight", R.apply(layer.weight.double()))
            layer.online = R
    final = get_path(model, layout.final_norm)
    _read_stream(head, final.weight, Q)
    final.weight.fill_(1.0)
    return {"residual": f"{Q.size}: {describe(Q)}", "mlp": f"{R_mlp.size}: {describe(R_mlp)}",
            "attention": f"{R_attn.size}: {describe(R_attn)}", "head_dim": f"{R_head.size}: {describe(R_head)}"}


def _set(module: nn.Module, name: str, value: torch.Tensor):
    old = getattr(module, name)
    old.data = value.to(old.dtype)


def _read_stream(layer: nn.Linear, norm_scale: torch.Tensor, Q: Rotation):
    """y = (γ ⊙ x) Wᵀ  ->  y = (x Q) W'ᵀ  with  W' = W diag(γ) Q."""
    _set(layer, "weight", Q.apply(layer.weight.double() * norm_scale.double()))


def _write_stream(layer: nn.Linear, Q: Rotation):
    """y -> y Q:  W' = Qᵀ W,  b' = b Q."""
    _set(layer, "weight", Q.apply(layer.weight.double().T).T)
    if layer.bias is not None:
        _set(layer, "bias", Q.apply(layer.bias.double()))


def _heads_right(W: torch.Tensor, R: Rotation, head_dim: int) -> torch.Tensor:
    """W times the block-diagonal matrix of R over its input heads."""
    out, width = W.shape
    return R.apply(W.reshape(out, width // head_dim, head_dim)).reshape(out, width)


def _rotate_value_heads(v: nn.Linear, R: Rotation, head_dim: int):
    """Every value head's output times R:  W' = blockdiag(R)ᵀ W,  b' = b blockdiag(R)."""
    _set(v, "weight", _heads_right(v.weight.double().T, R, head_dim).T)
    if v.bias is not None:
        _set(v, "bias", _heads_right(v.bias.double().unsqueeze(0), R, head_dim)[0])
