"""What the engine needs to know about a model family, as data plus two small functions.

A block is walked as a generator: it yields a ``Stage`` (the linears that read one input,
and that input) before those linears run, and returns the block's output. The engine
quantizes a stage's linears while the generator is paused, so every later stage already
sees the quantized earlier layers, in one forward pass per block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Stage:
    kinds: tuple[str, ...]    # e.g. ("q", "k", "v"): linears that share the input x
    x: torch.Tensor           # [batch, seq, d_in]


BlockForward = Callable[[nn.Module, torch.Tensor, Any], Generator[Stage, None, torch.Tensor]]


@dataclass(frozen=True)
class AttentionGeometry:
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class ResidualLayout:
    """Where a pre-norm decoder's residual stream is read and written: what rotating the stream touches
    (see ``workbench.rotate``). Paths are from the model (embedding, head, final norm) or from a block."""
    embedding: str
    head: str
    final_norm: str
    norms: tuple[tuple[str, tuple[str, ...]], ...]   # a block's norm -> the linears that read its output
    writers: tuple[str, ...]                          # linears whose output is added to the stream
    value: str = "v"                                  # its output heads are rotated, and o_proj's input with them
    attention_out: str = "o"
    mlp_out: str = "down"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks_path: str                        # attribute path from the model to its block list
    attention_path: str                     # attribute path from a block to its attention module
    linears: dict[str, str]                 # kind -> attribute path inside a block
    block_forward: BlockForward
    qkv: Callable[[nn.Module, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    context: Callable[[nn.Module, torch.Tensor], Any]   # (model, hidden [b, L, d]) -> ctx
    geometry: Callable[[Any], AttentionGeometry]        # (config) -> heads
    attention_kinds: tuple[str, ...] = field(default=("q", "k", "v"))
    # linears that read one input and that serving stacks (vLLM) fuse into one matmul with one scheme
    fused: tuple[tuple[str, ...], ...] = (("q", "k", "v"),)
    # modules the model applies after its blocks and before its head, in order (absent ones are skipped)
    final_modules: tuple[str, ...] = ()
    # the residual stream's layout when it can be rotated exactly (RMSNorm without bias), else None and why not
    residual: ResidualLayout | None = None
    not_rotatable: str = ""

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_path(model, self.blocks_path)

    def linear(self, block: nn.Module, kind: str) -> nn.Linear:
        return get_path(block, self.linears[kind])

    def attention(self, block: nn.Module) -> nn.Module:
        return get_path(block, self.attention_path)

    def finals(self, model: nn.Module) -> list[nn.Module]:
        """The modules between the last block and the head that the model has."""
        found = [get_path_or_none(model, p) for p in self.final_modules]
        return [m for m in found if m is not None]

    def layer_name(self, block: int, kind: str) -> str:
        """The module path of a linear in the model: what reports, spectra and errors join on."""
        return f"{self.blocks_path}.{block}.{self.linears[kind]}"


def get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def get_path_or_none(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def repeat_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    """``[b, kv, L, d]`` -> ``[b, kv * group, L, d]``: each KV head serves ``group`` query heads."""
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention over post-rotary heads; returns ``[b, L, n_heads * d]``."""
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, repeat_kv(k, group), repeat_kv(v, group), is_causal=True, scale=scaling)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scaling: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax probabilities ``[b, n_heads, L, L]`` (explicit, for statistics).

    All in place on one ``[b, h, L, L]`` buffer (``out``, when given, is reused): these are the
    largest tensors of the statistics, and a fresh one costs more in page faults than its softmax.
    """
    group = q.shape[1] // k.shape[1]
    logits = torch.matmul(q, repeat_kv(k, group).transpose(-1, -2), out=out).mul_(scaling)
    L = q.shape[2]
    mask = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(logits.masked_fill_(mask, float("-inf")), dim=-1, out=logits)


def split_heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[b, L, n * d]`` -> ``[b, n, L, d]``."""
    b, L, _ = t.shape
    return t.view(b, L, -1, head_dim).transpose(1, 2)
