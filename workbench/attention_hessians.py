"""Attention-aware Hessians for q/k/v, accumulated while streaming the calibration batches.

Query of head h (rows of W_q): the logit error of position t is ``(R_t dq_t)^T k'_s`` for the
keys ``s <= t``, so its output factor is ``sum_t R_t^T (sum_{s<=t} k'_s k'_s^T) R_t``: the
post-RoPE keys rotated into the query's frame. Keys: the same with the roles exchanged,
``sum_s R_s^T (sum_{t>=s} q'_t q'_t^T) R_s``. With ``R_t = C_t + S_t J`` (RoPE's cos/sin
diagonals and its rotate-half permutation J), each term is an elementwise product of a
per-position moment ``G_u = sum_samples k'_u k'_u^T`` with a table that depends on positions
only, so only ``G`` is accumulated: ``[n_kv_heads, L, d, d]`` float64 sums per layer.

Value of KV head g: ``H_in^g = sum_{h in g} E[X A_h^T A_h X^T]`` (``[n_kv_heads, d_in, d_in]``),
taken as ``X^T M_g X`` with ``M_g = sum_{h in g} A_h^T A_h`` (``L x L``, causal and symmetric), which
needs about 37% fewer multiply-adds than the heads' inputs ``A_h X`` and their Gram matrix; its
output factor is the identity or ``mean_h W_O,h^T W_O,h`` (``[n_kv_heads, d, d]``).
Memory per block: 2 x n_kv x L x d^2 (G for keys and queries) + n_kv x d_in^2 (value), 8 bytes each.
"""
from __future__ import annotations

import torch

from .hessians import add_upper_product, symmetric_from_upper
from .models.base import AttentionGeometry, attention_probs, repeat_kv

VALUE_OUTPUTS = ("identity", "o_proj")


def rotate_half_right(A: torch.Tensor) -> torch.Tensor:
    """``A J`` with ``J x = rotate_half(x) = [-x_2, x_1]``."""
    h = A.shape[-1] // 2
    return torch.cat([A[..., h:], -A[..., :h]], dim=-1)


def rotate_half_left_t(A: torch.Tensor) -> torch.Tensor:
    """``J^T A``."""
    h = A.shape[-2] // 2
    return torch.cat([A[..., h:, :], -A[..., :h, :]], dim=-2)


def position_tables(cos: torch.Tensor, sin: torch.Tensor, later: bool) -> dict[str, torch.Tensor]:
    """``B^{ab}_u = sum_{t >= u} a_t b_t^T`` (``later``) or ``sum_{t <= u}``, for a, b in {cos, sin}.

    ``cos``/``sin``: ``[L, d]``. Returns ``[L, d, d]`` tables keyed "cc", "cs", "ss".
    """
    out = {}
    for key, (a, b) in {"cc": (cos, cos), "cs": (cos, sin), "ss": (sin, sin)}.items():
        outer = a.unsqueeze(-1) * b.unsqueeze(-2)
        out[key] = outer.flip(0).cumsum(0).flip(0) if later else outer.cumsum(0)
    return out


def rope_sandwich(G: torch.Tensor, tables: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_t R_t^T (sum_{u in window(t)} G_u) R_t`` from per-position moments ``G [H, L, d, d]``."""
    T = {k: (G * t).sum(1) for k, t in tables.items()}
    cs_j = rotate_half_right(T["cs"])
    return T["cc"] + cs_j + cs_j.transpose(-1, -2) + rotate_half_left_t(rotate_half_right(T["ss"]))


def probs_gram(A: torch.Tensor, group: int, chunks: int = 8, out: torch.Tensor | None = None) -> torch.Tensor:
    """``M_g = sum_{h in g} A_h^T A_h`` per KV head, ``[b, n_kv, L, L]``, for causal ``A [b, n_heads, L, L]``
    whose heads come in groups of ``group`` per KV head.

    Column block ``c0:c1`` of ``A^T A`` only reads the rows from ``c0`` on (``A`` is zero above its
    diagonal) and only its rows up to ``c1`` are computed, the rest being the mirror: about a
    quarter of the full product's multiply-adds. On 2 cores, for L = 512, 9 / 3 heads, d = 576, the
    value Hessian of a batch of 4 takes about 75 ms with 4, 8 or 16 chunks, against 112 ms for the
    heads' inputs ``A_h X`` and their Gram matrix (``benchmarks/scaling.py``).
    ``out`` (``[b, n_kv, L, L]``), when given, is reused.
    """
    b, h, L, _ = A.shape
    A5 = A.view(b, h // group, group, L, L)
    M = torch.empty(b, h // group, L, L, dtype=A.dtype, device=A.device) if out is None else out
    step = max(1, -(-L // chunks))
    starts = range(0, L, step)
    for c0 in starts:
        c1 = min(L, c0 + step)
        rows = group * (L - c0)     # the group's heads stacked as rows: one product per KV head
        left = A5[..., c0:, :c1].reshape(b, h // group, rows, c1)
        right = A5[..., c0:, c0:c1].reshape(b, h // group, rows, c1 - c0)
        torch.matmul(left.transpose(-1, -2), right, out=M[..., :c1, c0:c1])
    for c0 in starts:               # below the diagonal blocks: the mirror of what is above them
        c1 = min(L, c0 + step)
        M[..., c1:, c0:c1] = M[..., c0:c1, c1:].transpose(-1, -2)
    return M


def add_position_moments(G: torch.Tensor, t: torch.Tensor):
    """``G[h, l] += sum_{b, g} t[b, h, g, l]^T t[b, h, g, l]``: one batched matmul (an einsum makes
    thousands of tiny ones), for ``G [H, L, d, d]`` and ``t [b, H, n, L, d]``.

    The product runs in ``G``'s dtype, into ``G`` in place: for float64 sums of float32 inputs every
    product is exact, so samples split otherwise into batches or ranks change the sums only at
    float64 rounding (and on 2 cores, one block of 32 windows: 0.34 s with float32 products added
    to ``G``, 0.1 s so).
    """
    b, H, n, L, d = t.shape
    tt = t.permute(1, 3, 4, 0, 2).reshape(H * L, d, b * n).to(G.dtype)
    G.view(H * L, d, d).baddbmm_(tt, tt.transpose(1, 2))


class AttentionHessians:
    """Streams q/k/v statistics of one block; ``finish()`` gives the Kronecker factors per kind."""

    def __init__(self, geometry: AttentionGeometry, seqlen: int, d_in: int, device,
                 value_output: str = "identity"):
        if value_output not in VALUE_OUTPUTS:
            raise ValueError(f"value_output must be one of {VALUE_OUTPUTS}")
        g = geometry
        self.geometry, self.value_output = g, value_output
        # float64 sums, as for ``InputCovariance``: the same factors whatever the order of the batches
        self.G_keys = torch.zeros(g.n_kv_heads, seqlen, g.head_dim, g.head_dim, device=device, dtype=torch.float64)
        self.G_queries = torch.zeros_like(self.G_keys)
        self.H_value = torch.zeros(g.n_kv_heads, d_in, d_in, device=device, dtype=torch.float64)
        self.samples = 0
        self.tokens = 0
        self._buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """A work buffer kept from batch to batch (a fresh large tensor per batch costs page faults)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype:
            buf = self._buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def add(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scaling: float):
        """``x [b, L, d_in]``; post-rotary ``q [b, n_heads, L, d]``, ``k [b, n_kv, L, d]``."""
        g = self.geometry
        b, L = x.shape[:2]
        add_position_moments(self.G_keys, k.unsqueeze(2))
        add_position_moments(self.G_queries, q.reshape(b, g.n_kv_heads, g.group, L, g.head_dim))
        A = attention_probs(q, k, scaling, out=self._buffer("probs", (b, g.n_heads, L, L), q))
        M = probs_gram(A, g.group, out=self._buffer("probs_gram", (b, g.n_kv_heads, L, L), q))
        # M_g x per KV head, the samples' tokens as rows: one product over all of them per head
        Z = (M @ x.unsqueeze(1)).transpose(0, 1).reshape(g.n_kv_heads, b * L, -1)
        add_upper_product(self.H_value, x.reshape(b * L, -1), Z)
        self.samples += b
        self.tokens += b * L

    def reduce(self, ranks):
        """Sums over the ranks of a data-parallel run (``distributed.Ranks``), before ``finish``."""
        if ranks.active:
            ranks.sum_(self.G_keys, self.G_queries, self.H_value)
            samples, tokens = ranks.sum_numbers(self.samples, self.tokens)
            self.samples, self.tokens = int(samples), int(tokens)

    def finish(self, cos: torch.Tensor | None, sin: torch.Tensor | None, o_proj_weight: torch.Tensor | None = None) -> dict:
        """Factors per kind: ``{"q": {"H_out"}, "k": {"H_out"}, "v": {"H_in", "H_out"?}}``.

        ``cos``/``sin`` ``[L, d]`` are RoPE's tables (``None``: no rotation, as in OPT).
        """
        g = self.geometry
        self._buffers.clear()
        L, d = self.G_keys.shape[1], g.head_dim
        if cos is None:
            cos = torch.ones(L, d, device=self.G_keys.device)
            sin = torch.zeros(L, d, device=self.G_keys.device)
        n = max(self.tokens, 1)
        H_q = rope_sandwich(self.G_keys, position_tables(cos, sin, later=True)) / n
        H_k = rope_sandwich(self.G_queries, position_tables(cos, sin, later=False)) / n
        out = {"q": {"H_out": repeat_kv(H_q.unsqueeze(0), g.group)[0]},   # query heads share their KV head's
               "k": {"H_out": H_k},
               "v": {"H_in": symmetric_from_upper(self.H_value).mul_(2.0 / n)}}
        out = {kind: {name: f.float() for name, f in factors.items()} for kind, factors in out.items()}
        if self.value_output == "o_proj" and o_proj_weight is not None:
            Wo = o_proj_weight.float().reshape(-1, g.n_kv_heads, g.group, d)   # columns by (kv head, query head)
            out["v"]["H_out"] = torch.einsum("okgi,okgj->kij", Wo, Wo) / g.group
        return out
