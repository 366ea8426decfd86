import dataclasses
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.quant.grid import (GridConfig, dequantize, expand_groups, fake_quantize, group_params,
                                  minmax_params, mse_params, quantize_codes, rtn)


def test_minmax_asymmetric_covers_range_exactly():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    scale, zero = minmax_params(w, 3, symmetric=False)
    assert scale.item() == pytest.approx(1.0)
    assert zero.item() == 1
    # the extremes of the range are grid points
    q = fake_quantize(w, scale, zero, 3)
    assert q[0, 0] == -1.0 and q[0, 3] == 2.0


def test_symmetric_grid_is_centred():
    w = torch.tensor([[-3.0, 1.0, 0.2]])
    scale, zero = minmax_params(w, 15, symmetric=True)
    assert zero.item() == 8
    assert scale.item() == pytest.approx(6.0 / 15)


def test_all_zero_row_quantizes_to_zero():
    w = torch.zeros(2, 8)
    assert torch.equal(rtn(w, GridConfig(bits=3, group_size=4)), w)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_lies_on_grid_and_is_nearest(bits):
    torch.manual_seed(bits)
    w = torch.randn(5, 32)
    cfg = GridConfig(bits=bits, group_size=8)
    q = rtn(w, cfg)
    scale, zero = group_params(w, cfg)
    s, z = expand_groups(scale, 32), expand_groups(zero, 32)
    codes = quantize_codes(w, s, z, cfg.maxq)
    assert codes.min() >= 0 and codes.max() <= cfg.maxq
    assert torch.allclose(dequantize(codes, s, z), q)
    # brute force: no other code in range is closer to w
    all_codes = torch.arange(cfg.maxq + 1, dtype=torch.float32)
    candidates = s.unsqueeze(-1) * (all_codes - z.unsqueeze(-1))
    best = (candidates - w.unsqueeze(-1)).abs().min(-1).values
    assert torch.allclose((q - w).abs(), best, atol=1e-6)


def test_groups_have_their_own_grid():
    w = torch.cat([torch.full((1, 4), 0.01), torch.full((1, 4), 100.0)], dim=1)
    w[0, 0] = -0.01
    scale, _ = group_params(w, GridConfig(bits=4, group_size=4))
    assert scale.shape == (1, 2)
    assert scale[0, 0] < 0.01 < scale[0, 1]


def test_mse_search_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(16, 64) ** 3   # heavy tails: shrinking the range pays
    cfg = GridConfig(bits=3, group_size=-1, search="mse")
    err = lambda s, z: (fake_quantize(w, s, z, cfg.maxq) - w).abs().pow(cfg.mse_norm).sum(-1)
    e_mse = err(*mse_params(w, cfg))
    e_mm = err(*minmax_params(w, cfg.maxq, False))
    assert torch.all(e_mse <= e_mm + 1e-6)
    assert e_mse.sum() < 0.95 * e_mm.sum()


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bits_out_of_range(bits):
    with pytest.raises(WorkbenchError, match="bits must be"):
        GridConfig(bits=bits)


def test_group_size_must_divide_width():
    with pytest.raises(WorkbenchError, match="does not divide the input width 576"):
        GridConfig(group_size=100).group_width(576)
    assert GridConfig(group_size=-1).group_width(576) == 576


def _weighted_brute_force(w, weight, cfg):
    """Every shrink of the range, one at a time: the least weighted squared error, the first of equals."""
    from workbench.quant.grid import range_params
    best = None
    for i in range(int(cfg.mse_max_shrink * cfg.mse_steps) + 1):
        s, z = range_params(w.amin(), w.amax(), cfg.maxq, cfg.symmetric, 1 - i / cfg.mse_steps)
        err = float(((fake_quantize(w, s, z, cfg.maxq) - w) ** 2 * weight).sum())
        if best is None or err < best[0]:
            best = (err, float(s), float(z))
    return best


@pytest.mark.parametrize("symmetric", [False, True])
def test_hessian_search_takes_the_least_weighted_error_of_every_range(symmetric):
    g = torch.Generator().manual_seed(3)
    cfg = GridConfig(bits=2, group_size=16, symmetric=symmetric, search="hessian")
    W = torch.randn(5, 48, generator=g) * torch.linspace(0.2, 3, 48)
    weight = torch.rand(48, generator=g) ** 4 * 100        # a few columns the inputs excite most
    scale, zero = group_params(W, cfg, weight)
    for r in range(5):
        for gi in range(3):
            cols = slice(16 * gi, 16 * gi + 16)
            _, s, z = _weighted_brute_force(W[r, cols], weight[cols], cfg)
            assert scale[r, gi].item() == pytest.approx(s, rel=1e-6) and zero[r, gi].item() == z


def test_hessian_search_fits_the_heavy_columns_better_than_mse():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(64, 64, generator=g)
    weight = torch.ones(64)
    weight[:8] = 1000.0
    heavy = GridConfig(bits=2, group_size=64, search="hessian")
    plain = GridConfig(bits=2, group_size=64, search="mse", mse_norm=2.0)

    def weighted_loss(cfg):
        s, z = group_params(W, cfg, weight)
        q = fake_quantize(W, expand_groups(s, 64), expand_groups(z, 64), cfg.maxq)
        return float(((q - W) ** 2 * weight).sum())
    assert weighted_loss(heavy) < 0.9 * weighted_loss(plain)
    # without weights (a method with no Hessian) the search is the MSE one
    assert torch.equal(group_params(W, heavy)[0], group_params(W, dataclasses.replace(heavy, search="mse"))[0])
