import pytest
import torch
from torch import nn

from genie_nets import smooth_images
from workbench.errors import WorkbenchError
from workbench.genie.act_quant import ActQuantizer, int_range, lsq_quantize, mse_step
from workbench.genie.fold import conv_bn_pairs, fold_batchnorm
from workbench.genie.qlayers import QuantLayer, find_units
from workbench.genie.quantize import GenieMConfig, quantize_model
from workbench.quant.grid import GridConfig


def test_fold_batchnorm_is_exact(resnet18_shaped):
    x = torch.randn(4, 3, 32, 32)
    pairs = conv_bn_pairs(resnet18_shaped, x[:1])
    assert ("conv1", "bn1") in pairs and ("layer2.0.shortcut.0", "layer2.0.shortcut.1") in pairs
    assert len(pairs) == 1 + 8 * 2 + 3          # stem, two per block, three shortcuts
    folded = fold_batchnorm(resnet18_shaped, x[:1])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in resnet18_shaped.modules())   # original kept
    with torch.no_grad():
        torch.testing.assert_close(folded(x), resnet18_shaped(x), rtol=1e-4, atol=1e-4)


def test_units_follow_blocks(resnet18_shaped, tiny_cnn):
    assert find_units(tiny_cnn) == ["stem", "layer1.0", "layer2.0", "layer3.0", "fc"]
    assert find_units(resnet18_shaped) == ["conv1"] + [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)] + ["fc"]


def test_lsq_quantizer_grid_and_gradients():
    x = torch.linspace(-1, 3, 101, requires_grad=True)
    step = torch.tensor(0.25, requires_grad=True)
    qmin, qmax = int_range(3, signed=False)
    y = lsq_quantize(x, step, qmin, qmax, grad_factor=1.0)
    codes = y.detach() / 0.25
    torch.testing.assert_close(codes, codes.round())
    assert float(y.detach().min()) == 0.0 and float(y.detach().max()) == pytest.approx(7 * 0.25)
    y.sum().backward()
    inside = (x.detach() >= 0) & (x.detach() <= 7 * 0.25)
    assert torch.all(x.grad[inside] == 1) and torch.all(x.grad[~inside] == 0)   # straight through in range
    assert step.grad is not None and float(step.grad) != 0


def test_act_quantizer_initializes_from_data():
    x = torch.relu(torch.randn(4096))
    q = ActQuantizer(4)
    y = q(x)
    assert q.initialized and not q.signed
    s = float(q.step.detach())
    assert s == pytest.approx(mse_step(x, 4, False))
    assert s * 15 < float(x.max())                       # the MSE range clips the tail
    y = y.detach()
    assert float(((y - x) ** 2).mean()) < float(((torch.round(x / (x.max() / 15)) * x.max() / 15 - x) ** 2).mean())
    with pytest.raises(WorkbenchError, match="activation bits"):
        ActQuantizer(1)


def check_on_grid(qlayer: QuantLayer):
    r = qlayer.rounder.result()
    assert int(r.codes.min()) >= 0 and int(r.codes.max()) <= 2 ** qlayer.weight_bits - 1
    w = qlayer.rounder().detach().reshape(r.codes.shape)
    torch.testing.assert_close(w, r.scale * (r.codes.float() - r.zero), rtol=0, atol=1e-6)


def test_genie_m_beats_rtn_block_error(tiny_cnn):
    calib = smooth_images(64, (1, 16, 16), seed=1)
    cfg = dict(weight_bits=3, act_bits=4, iters=150, batch_size=16, seed=0)
    rtn = quantize_model(tiny_cnn, calib, GenieMConfig(method="rtn", **cfg))
    genie = quantize_model(tiny_cnn, calib, GenieMConfig(method="genie", **cfg))
    assert [u.name for u in genie.units] == ["stem", "layer1.0", "layer2.0", "layer3.0", "fc"]
    # the first block sees the same inputs in both runs: its RTN error is the starting point
    assert genie.units[0].start_rel_error == pytest.approx(rtn.units[0].rel_error, rel=1e-5)
    for g_unit, r_unit in zip(genie.units, rtn.units):
        assert g_unit.rel_error < g_unit.start_rel_error
        assert g_unit.rel_error < r_unit.rel_error
    inner = genie.units[1:-1]
    assert sum(u.rel_error for u in inner) < 0.8 * sum(u.start_rel_error for u in inner)
    # bits: the first conv and last linear at 8, the rest at 3; all weights on their grids
    qlayers = [m for m in genie.model.modules() if isinstance(m, QuantLayer)]
    assert [q.weight_bits for q in qlayers] == [8] + [3] * 8 + [8]
    for q in qlayers:
        assert q.rounder.hard
        check_on_grid(q)
    # the quantized model runs on its own and stays close to the float model
    with torch.no_grad():
        out, ref = genie.model(calib), tiny_cnn(calib)
    assert out.shape == ref.shape
    assert float((out - ref).pow(2).sum() / ref.pow(2).sum()) < 0.5


def test_weights_only_and_same_bits_everywhere(tiny_cnn):
    calib = smooth_images(16, (1, 16, 16), seed=2)
    res = quantize_model(tiny_cnn, calib, GenieMConfig(weight_bits=2, act_bits=0, iters=5, ends_bits=None))
    qlayers = [m for m in res.model.modules() if isinstance(m, QuantLayer)]
    assert all(q.weight_bits == 2 and q.act is None for q in qlayers)
    assert len(res.units[0].loss) == 5


def test_resnet18_shaped_runs(resnet18_shaped):
    calib = smooth_images(8, (3, 32, 32), seed=3)
    res = quantize_model(resnet18_shaped, calib, GenieMConfig(weight_bits=4, act_bits=4, iters=3))
    assert len(res.units) == 10
    with torch.no_grad():
        assert res.model(calib).shape == (8, 10)


@pytest.mark.parametrize("kwargs, match", [({"weight_bits": 1}, "weight bits"), ({"weight_bits": 9}, "weight bits"),
                                           ({"act_bits": 1}, "activation bits"), ({"act_bits": 12}, "activation bits"),
                                           ({"method": "gptq"}, "method"), ({"ends_bits": 10}, "first/last")])
def test_bad_quant_config(kwargs, match):
    with pytest.raises(WorkbenchError, match=match):
        GenieMConfig(**kwargs)


def test_quant_layer_refuses_other_modules():
    with pytest.raises(WorkbenchError, match="Conv2d and Linear"):
        QuantLayer(nn.BatchNorm2d(3), GridConfig(bits=4, group_size=-1))


def test_empty_calibration_is_refused(tiny_cnn):
    with pytest.raises(WorkbenchError, match="calibration"):
        quantize_model(tiny_cnn, torch.zeros(0, 1, 16, 16), GenieMConfig())
