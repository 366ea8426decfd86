"""Orthogonal rotations of a transformer's hidden stream (QuaRot-style): x -> x @ M.

A rotation spreads outlier channels over all channels, so a grid fitted to the rotated weights
and activations wastes less range. M is one of two kinds:

* ``"hadamard"``: a normalized Kronecker product ``A ⊗ B`` of a Paley Hadamard matrix of order
  ``p`` and a Sylvester one of order ``m = 2^k``. Applied as two small matmuls over a
  ``[p, m]`` view of the last dimension, it costs ``n (p + m)`` per row instead of ``n^2``.
* ``"random"``: a dense Haar-distributed orthogonal matrix drawn from a seeded generator, for
  sizes without a Hadamard factorization (and as the baseline the Hadamard kind is judged by).

Row-vector convention throughout: ``rotation.apply(x) == x @ rotation.matrix()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import WorkbenchError

KINDS = ("hadamard", "random")


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


SPLIT_ABOVE = 256     # a Sylvester order beyond this is applied as two smaller Sylvester factors


def sylvester(n: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order ``n = 2^k`` (int64), built as ``H_2 ⊗ H_2 ⊗ ...``."""
    if not isinstance(n, int) or not is_power_of_two(n):
        raise WorkbenchError(f"a Sylvester Hadamard matrix has an order that is a power of two, got {n!r}")
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    h = torch.ones(1, 1, dtype=torch.int64)
    for _ in range(n.bit_length() - 1):
        h = torch.kron(h, h2)
    return h


def paley_order(q: int) -> int:
    """Order of the Paley Hadamard matrix from an odd prime ``q``: q+1 (I) or 2(q+1) (II)."""
    if not isinstance(q, int) or q == 2 or not is_prime(q):
        raise WorkbenchError(f"the Paley construction needs an odd prime, got {q!r}")
    return q + 1 if q % 4 == 3 else 2 * (q + 1)


def legendre_symbols(q: int) -> torch.Tensor:
    """chi(a) for a = 0..q-1: 0 at 0, +1 on the nonzero quadratic residues mod q, -1 elsewhere."""
    residues = {(i * i) % q for i in range(1, q)}
    return torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.int64)


def jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i mod q): skew for q ≡ 3 (mod 4), symmetric for q ≡ 1 (mod 4)."""
    idx = torch.arange(q)
    return legendre_symbols(q)[(idx[None, :] - idx[:, None]) % q]


def bordered_jacobsthal(q: int, column_sign: int) -> torch.Tensor:
    """[[0, 1ᵀ], [s·1, Q]]: with s = -1 (q ≡ 3) a skew conference matrix, with s = +1 (q ≡ 1) a
    symmetric one; either way C Cᵀ = q I because Q Qᵀ = q I - J and Q's rows sum to zero."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = column_sign
    c[1:, 1:] = jacobsthal(q)
    return c


def paley(q: int) -> torch.Tensor:
    """The ±1 Hadamard matrix (int64) of order ``paley_order(q)`` from an odd prime ``q``."""
    paley_order(q)               # refuses anything but an odd prime
    if q % 4 == 3:
        # S skew with S Sᵀ = q I, so (I + S)(I + S)ᵀ = I + S Sᵀ = (q + 1) I
        return torch.eye(q + 1, dtype=torch.int64) + bordered_jacobsthal(q, -1)
    # the conference matrix has zeros only on its diagonal; those cells take the other 2x2 block,
    # and the two blocks are orthogonal to each other, which cancels the cross terms
    c = bordered_jacobsthal(q, 1)
    off = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    diagonal = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    return torch.kron(c, off) + torch.kron(torch.eye(q + 1, dtype=torch.int64), diagonal)


def paley_prime(order: int) -> int | None:
    """The prime whose Paley construction has this order (construction I first), or None."""
    q = order - 1
    if q % 4 == 3 and is_prime(q):
        return q
    q = order // 2 - 1
    if order % 2 == 0 and q % 4 == 1 and is_prime(q):
        return q
    return None


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """``(p, m)`` with ``p * m = n``, ``p`` 1 or a Paley order, ``m`` a power of two and ``p`` as
    small as possible (the dense factor is the costly one); None when there is none."""
    if not isinstance(n, int) or n < 1:
        return None
    p = n // (n & -n)            # the odd part: every candidate is it times a power of two
    while n % p == 0:
        if p == 1 or paley_prime(p) is not None:
            return p, n // p
        p *= 2
    return None


def base_hadamard(p: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order 1 or a Paley order ``p``."""
    if p == 1:
        return torch.ones(1, 1, dtype=torch.int64)
    q = paley_prime(p)
    if q is None:
        raise WorkbenchError(f"no Paley Hadamard matrix of order {p}")
    return paley(q)


def normalized(h: torch.Tensor) -> torch.Tensor:
    """A ±1 Hadamard matrix scaled to be orthogonal (float64)."""
    return h.to(torch.float64) / math.sqrt(h.shape[0])


def haar_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-distributed n x n orthogonal matrix (float64), the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    # QR alone is not Haar: fixing diag(R) > 0 makes the factorization unique, hence unbiased
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
    return q * signs


@dataclass(frozen=True, eq=False)
class Rotation:
    """An n x n orthogonal matrix ``M = left ⊗ right`` (float64 factors).

    A random rotation is the dense matrix in ``left`` with a 1x1 ``right``, so both kinds share
    one ``apply``. ``eq=False``: equality of tensor fields has no single truth value.
    """
    kind: str
    size: int
    left: torch.Tensor = field(repr=False)
    right: torch.Tensor = field(repr=False)
    cast: dict = field(default_factory=dict, init=False, repr=False)   # (dtype, device) -> (left, right)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise WorkbenchError(f"unknown rotation kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        p, m = self.left.shape[0], self.right.shape[0]
        if self.left.shape != (p, p) or self.right.shape != (m, m) or p * m != self.size:
            raise WorkbenchError(f"factors {tuple(self.left.shape)} and {tuple(self.right.shape)} "
                                 f"do not make a {self.size} x {self.size} Kronecker product")

    @property
    def orders(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[0]

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.kron(self.left, self.right).to(dtype)

    def factors_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not x.is_floating_point():
            raise WorkbenchError(f"a rotation applies to floating-point tensors, got {x.dtype}")
        if x.shape[-1] != self.size:
            raise WorkbenchError(f"a rotation of size {self.size} cannot apply to a last dimension of {x.shape[-1]}")
        key = (x.dtype, x.device)
        if key not in self.cast:
            # rounding the float64 factors once, not per call; a race only computes it twice
            self.cast[key] = (self.left.to(dtype=x.dtype, device=x.device),
                              self.right.to(dtype=x.dtype, device=x.device))
        return self.cast[key]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ M`` over the last dimension, in the dtype of ``x``."""
        a, b = self.factors_for(x)
        return kron_matmul(x, a, b, transposed=False)

    def apply_transposed(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Mᵀ``: the inverse of ``apply``, since M is orthogonal."""
        a, b = self.factors_for(x)
        return kron_matmul(x, a, b, transposed=True)


def kron_matmul(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``x @ kron(a, b)`` (or ``x @ kron(a, b)ᵀ``) without forming the Kronecker product.

    With x's last dim viewed as X of shape [p, m] (row-major, as ``kron`` indexes it),
    kron(a, b)[(i, k), (j, l)] = a[i, j] b[k, l] gives x @ kron(a, b) = aᵀ X b, and the
    transposed product is a X bᵀ. A 1x1 factor is skipped: it is exactly 1.
    """
    p, m = a.shape[0], b.shape[0]
    if transposed:
        a, b = a.T, b.T
    y = x.reshape(*x.shape[:-1], p, m)
    if m > 1:
        y = y @ b
    if p > 1:
        y = a.T @ y
    return y.reshape(x.shape)


def rotation(n: int, kind: str, seed: int = 0) -> Rotation:
    """An orthogonal n x n rotation. ``"hadamard"`` falls back to a seeded random one where n has
    no Hadamard factorization; the result's ``kind`` says which it got."""
    if kind not in KINDS:
        raise WorkbenchError(f"unknown rotation kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not isinstance(n, int) or n < 1:
        raise WorkbenchError(f"a rotation needs a positive integer size, got {n!r}")
    factors = hadamard_factors(n) if kind == "hadamard" else None
    if factors is None:
        return Rotation("random", n, haar_orthogonal(n, seed), torch.ones(1, 1, dtype=torch.float64))
    p, m = factors
    if p == 1 and m > SPLIT_ABOVE:
        # H_2^(a+b) = H_2^a ⊗ H_2^b: two factors near sqrt(n) cost n (2 sqrt n) per row, not n^2
        p = 1 << ((m.bit_length() - 1) // 2)
        return Rotation("hadamard", n, normalized(sylvester(p)), normalized(sylvester(m // p)))
    return Rotation("hadamard", n, normalized(base_hadamard(p)), normalized(sylvester(m)))
