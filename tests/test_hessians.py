import pytest
import torch

from workbench.hessians import InputCovariance, add_gram, symmetric_from_upper


@pytest.mark.parametrize("shape", [(50, 7), (3, 40, 10), (64, 1)])
@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_gram_from_upper_blocks_equals_the_full_product(shape, blocks):
    torch.manual_seed(0)
    y = torch.randn(*shape, dtype=torch.float64)
    acc = torch.zeros(*shape[:-2], shape[-1], shape[-1], dtype=torch.float64)
    add_gram(acc, y, blocks)
    add_gram(acc, 2 * y, blocks)
    torch.testing.assert_close(symmetric_from_upper(acc), 5 * y.transpose(-1, -2) @ y)


def test_input_covariance_is_symmetric_and_scaled():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 9)
    cov = InputCovariance(9, "cpu")
    cov.add(x[:2])
    cov.add(x[2:])
    flat = x.reshape(-1, 9)
    torch.testing.assert_close(cov.H, 2 * flat.T @ flat / flat.shape[0])
    assert torch.equal(cov.H, cov.H.T)
