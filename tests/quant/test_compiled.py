import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.quant import compiled


def scaled_sum(x, y):
    return (x * 2 + y).sum()


def test_kernel_gives_the_eager_result():
    x, y = torch.randn(5, 7), torch.randn(5, 7)
    torch.testing.assert_close(compiled.kernel(scaled_sum)(x, y), scaled_sum(x, y))


def test_a_failing_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken_compile(fn, **kw):
        def call(*args):
            raise RuntimeError("no C++ compiler")
        return call

    def fresh(x):            # a function the kernel cache has not seen
        return x + 1

    monkeypatch.setattr(compiled.torch, "compile", broken_compile)
    k = compiled.kernel(fresh)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert torch.equal(k(torch.zeros(3)), torch.ones(3))
    assert torch.equal(k(torch.ones(3)), torch.full((3,), 2.0))     # later calls stay eager, silently


def test_compiling_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("WORKBENCH_COMPILE", "0")
    assert compiled.kernel(scaled_sum) is scaled_sum


def test_a_nonsense_compile_switch_is_refused(monkeypatch):
    monkeypatch.setenv("WORKBENCH_COMPILE", "yes")
    with pytest.raises(WorkbenchError, match="WORKBENCH_COMPILE must be 0 .* or 1"):
        compiled.kernel(scaled_sum)
