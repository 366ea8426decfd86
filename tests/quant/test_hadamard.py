"""Hadamard and random rotations: exact integer orthogonality, factor choice, and the
Kronecker ``apply`` against dense matrix products."""
from __future__ import annotations

import pytest
import torch

from workbench.quant.hadamard import (Rotation, hadamard_factors, is_prime, paley, paley_order, rotation,
                                      sylvester)

PALEY_PRIMES_UP_TO_64 = [q for q in range(3, 64) if is_prime(q) and paley_order(q) <= 64]


def assert_hadamard(h: torch.Tensor, n: int):
    assert h.shape == (n, n)
    assert h.dtype == torch.int64
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.int64))


def max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128])
def test_sylvester_is_hadamard(n):
    assert_hadamard(sylvester(n), n)


@pytest.mark.parametrize("n", [0, 3, 12, 100])
def test_sylvester_refuses_other_orders(n):
    with pytest.raises(ValueError):
        sylvester(n)


def test_paley_primes_cover_both_constructions():
    orders = {q: paley_order(q) for q in PALEY_PRIMES_UP_TO_64}
    assert orders[11] == 12 and orders[19] == 20 and orders[43] == 44        # I: q + 1
    assert orders[17] == 36 and orders[13] == 28 and orders[29] == 60        # II: 2 (q + 1)


@pytest.mark.parametrize("q", PALEY_PRIMES_UP_TO_64)
def test_paley_is_hadamard(q):
    assert_hadamard(paley(q), paley_order(q))


@pytest.mark.parametrize("q", [1, 2, 9, 15])
def test_paley_refuses_non_odd_primes(q):
    with pytest.raises(ValueError):
        paley(q)


@pytest.mark.parametrize("n, factors", [
    (576, (36, 16)), (1536, (12, 128)), (64, (1, 64)), (4096, (1, 4096)), (12, (12, 1)), (40, (20, 2)),
    (9, None), (100, None),
])
def test_hadamard_factors(n, factors):
    assert hadamard_factors(n) == factors


@pytest.mark.parametrize("n", [576, 1536, 64, 12])
def test_hadamard_rotation_is_orthogonal(n):
    r = rotation(n, "hadamard")
    assert r.kind == "hadamard" and r.size == n and r.orders == hadamard_factors(n)
    m = r.matrix(torch.float64)
    assert (m.T @ m - torch.eye(n, dtype=torch.float64)).abs().max().item() < 1e-10


def test_kron_view_matches_torch_kron_for_unstructured_factors():
    """Non-symmetric, non-orthogonal factors: any transposed or swapped axis would show."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, 5, generator=g, dtype=torch.float64)
    r = Rotation("hadamard", 15, a, b)
    x = torch.randn(2, 3, 15, generator=g, dtype=torch.float64)
    assert torch.allclose(r.apply(x), x @ torch.kron(a, b), rtol=0, atol=1e-12)
    assert torch.allclose(r.apply_transposed(x), x @ torch.kron(a, b).T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [576, 1536, 64, 12, 9])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_apply_equals_dense_products(n, dtype, tolerance):
    r = rotation(n, "hadamard")
    m = r.matrix(dtype)
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n), dtype=dtype)
    y = r.apply(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert max_relative_error(y, x @ m) < tolerance
    assert max_relative_error(r.apply_transposed(x), x @ m.T) < tolerance


def test_apply_transposed_inverts_apply():
    r = rotation(1536, "hadamard")
    x = torch.randn(4, 1536, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert max_relative_error(r.apply_transposed(r.apply(x)), x) < 1e-12


def test_apply_refuses_a_wrong_width_or_integer_input():
    r = rotation(12, "hadamard")
    with pytest.raises(ValueError, match="size 12"):
        r.apply(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="floating-point"):
        r.apply(torch.zeros(2, 12, dtype=torch.int64))


def test_random_rotation_is_orthogonal_and_seeded():
    r = rotation(48, "random", seed=3)
    assert r.kind == "random"
    m = r.matrix()
    assert (m.T @ m - torch.eye(48, dtype=torch.float64)).abs().max().item() < 1e-10
    assert torch.equal(m, rotation(48, "random", seed=3).matrix())
    assert not torch.allclose(m, rotation(48, "random", seed=4).matrix())


@pytest.mark.parametrize("n", [9, 100])
def test_sizes_without_a_factorization_fall_back_to_random(n):
    r = rotation(n, "hadamard", seed=7)
    assert r.kind == "random"
    assert torch.equal(r.matrix(), rotation(n, "random", seed=7).matrix())


def test_bad_kind_names_the_choices():
    with pytest.raises(ValueError, match="hadamard, random"):
        rotation(64, "givens")


def test_a_large_power_of_two_is_two_sylvester_factors_and_still_sylvester():
    from workbench.quant.hadamard import normalized
    rot = rotation(4096, "hadamard")
    assert rot.orders == (64, 64)
    assert torch.equal(rot.matrix(torch.float64), normalized(sylvester(4096)))
