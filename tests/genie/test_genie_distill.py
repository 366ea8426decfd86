import pytest
import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.genie.bn_stats import BNStatsLoss, batchnorm_layers, bn_stats_loss, channel_stats
from workbench.genie.distill import DistillConfig, _batches, distill
from workbench.genie.generator import Generator
from workbench.genie.swing import SwingConv, strided_convs, swing_shift


def record_input(model, module, x):
    seen = []

    def keep(mod, args):
        seen.append(args[0])
    h = module.register_forward_pre_hook(keep)
    with torch.no_grad():
        model(x)
    h.remove()
    return seen[0]


def test_channel_stats_match_torch():
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    mean, std = channel_stats(x, eps=0.0)
    torch.testing.assert_close(mean, x.transpose(0, 1).reshape(3, -1).mean(1))
    torch.testing.assert_close(std, x.transpose(0, 1).reshape(3, -1).std(1, unbiased=False))


def test_bn_loss_is_zero_on_matching_statistics():
    bn = nn.BatchNorm2d(3).eval()
    model = nn.Sequential(bn)
    x = torch.randn(64, 3, 8, 8)
    mean, std = channel_stats(x, bn.eps)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(std ** 2 - bn.eps)
    assert bn_stats_loss(model, x) < 1e-8
    assert bn_stats_loss(model, x + 1) == pytest.approx(3.0, rel=1e-4)   # 3 channels, mean off by 1


@pytest.mark.parametrize("source", ["genie", "pixels"])
def test_distillation_lowers_and_matches_bn_statistics(tiny_cnn, source):
    losses = []
    cfg = DistillConfig(source=source, samples=32, batch_size=32, steps=80, image_shape=(1, 16, 16), seed=1)
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    x = distill(tiny_cnn, cfg, callback=lambda step, loss: losses.append((step, loss)))
    assert x.shape == (32, 1, 16, 16)
    assert [s for s, _ in losses] == list(range(80))
    assert losses[-1][1] < 0.25 * losses[0][1]
    noise = bn_stats_loss(tiny_cnn, torch.randn(32, 1, 16, 16))
    assert bn_stats_loss(tiny_cnn, x) < 0.25 * noise
    # every layer's statistics move towards the stored ones, not just the total
    for bn in batchnorm_layers(tiny_cnn):
        seen = record_input(tiny_cnn, bn, x)
        mean, std = channel_stats(seen, bn.eps)
        assert float((mean - bn.running_mean).abs().mean()) < 0.3
        assert float((std - (bn.running_var + bn.eps).sqrt()).abs().mean()) < 0.3
    # the model is untouched: weights, eval mode, gradient flags
    assert all(torch.equal(before[k], v) for k, v in tiny_cnn.state_dict().items())
    assert not tiny_cnn.training and all(p.requires_grad for p in tiny_cnn.parameters())


def test_distillation_is_reproducible_and_batched(tiny_cnn):
    cfg = DistillConfig(samples=9, batch_size=4, steps=3, image_shape=(1, 16, 16), seed=3)
    assert _batches(cfg) == [4, 5]             # a lone image joins the previous batch
    assert _batches(DistillConfig(samples=10, batch_size=4)) == [4, 4, 2]
    a, b = distill(tiny_cnn, cfg), distill(tiny_cnn, cfg)
    assert a.shape == (9, 1, 16, 16)
    torch.testing.assert_close(a, b)


def test_noise_source_is_gaussian(tiny_cnn):
    x = distill(tiny_cnn, DistillConfig(source="noise", samples=256, image_shape=(1, 16, 16)))
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05


def test_resnet18_shaped_model(resnet18_shaped):
    cfg = DistillConfig(samples=8, batch_size=8, steps=5, image_shape=(3, 32, 32))
    losses = []
    x = distill(resnet18_shaped, cfg, callback=lambda s, l: losses.append(l))
    assert x.shape == (8, 3, 32, 32) and torch.isfinite(x).all()
    assert len(losses) == 5 and losses[-1] < losses[0]


def test_model_without_batchnorm_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(WorkbenchError, match="no BatchNorm2d"):
        distill(model, DistillConfig(samples=2, steps=1, image_shape=(1, 8, 8)))
    with pytest.raises(WorkbenchError, match="BatchNorm"):
        BNStatsLoss(model)


@pytest.mark.parametrize("kwargs, match", [({"samples": 0}, "samples"), ({"source": "gan"}, "source"),
                                           ({"steps": -1}, "steps"), ({"image_shape": (8, 8)}, "image shape")])
def test_bad_distill_config(kwargs, match):
    with pytest.raises(WorkbenchError, match=match):
        DistillConfig(**kwargs)


def test_swing_shift_keeps_shape_and_moves_content():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    assert torch.equal(swing_shift(x, 1, 1, 1), x)                 # the centre crop is the input
    shifted = swing_shift(x, 1, 2, 0)
    assert shifted.shape == x.shape
    # offset (2, 0) of a 1-pixel pad: content moves up one row and right one column
    assert torch.equal(shifted[..., :-1, 1:], x[..., 1:, :-1])
    assert torch.equal(shifted[..., -1, 1:], x[..., -2, :-1])      # reflected bottom border
    assert swing_shift(torch.zeros(1, 1, 1, 1), 1, 0, 2).shape == (1, 1, 1, 1)


def test_swing_conv_keeps_output_shapes_and_randomizes(resnet18_shaped):
    convs = strided_convs(resnet18_shaped)
    assert len(convs) == 1 + 3 * 2          # stem and, per downsampling stage, conv1 and shortcut
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = resnet18_shaped(x)
        shapes = {}

        def keep_shape(mod, args, out):
            shapes[mod] = out.shape
        hooks = [c.register_forward_hook(keep_shape) for c in convs]
        with SwingConv(resnet18_shaped, generator=torch.Generator().manual_seed(0)):
            outs = [resnet18_shaped(x) for _ in range(4)]
        for h in hooks:
            h.remove()
        after = resnet18_shaped(x)
    assert all(o.shape == plain.shape for o in outs)
    assert any(not torch.allclose(o, plain) for o in outs)
    assert torch.equal(after, plain)                                 # hooks removed on exit
    with torch.no_grad():
        for c in convs:
            ref = []
            h = c.register_forward_hook(lambda m, a, o: ref.append(o.shape) and None)
            resnet18_shaped(x)
            h.remove()
            assert ref[0] == shapes[c]


def test_generator_output_shape_and_statistics():
    gen = Generator(16, (3, 20, 20), width=16)
    x = gen(torch.randn(6, 16))
    assert x.shape == (6, 3, 20, 20)
    assert float(x.detach().mean().abs()) < 0.1
