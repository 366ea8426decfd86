"""Genie's figure builders and captions on hand-made values."""
import numpy as np
import pytest
import torch

from workbench.figures.genie import blocks_figure, bn_loss_figure, confidence_text, prediction_captions
from workbench.genie.png import image_grid, image_tiles


@pytest.mark.parametrize("p, text", [(0.0, "0%"), (0.123, "12%"), (0.994, "99%"), (0.9949, "99%"),
                                     (0.995, "99.5%"), (0.9994, "99.9%"), (0.99951, ">99.9%"),
                                     (0.999999, ">99.9%"), (1.0, "100%")])
def test_confidence_never_rounds_up_to_certainty(p, text):
    assert confidence_text(p) == text


def test_every_confidence_reads_back_within_its_rounding():
    for p in np.linspace(0, 1, 2001):
        t = confidence_text(p)
        if t.startswith(">"):
            assert 0.9995 <= p < 1
        else:
            shown = float(t.rstrip("%")) / 100
            assert abs(shown - p) <= (0.0005 if "." in t else 0.005) + 1e-12
            assert shown < 1 or p == 1


def test_captions_pair_class_and_probability():
    assert prediction_captions([7, 0, 3], [0.98, 0.5, 1.0]) == ["7 · 98%", "0 · 50%", "3 · 100%"]
    assert prediction_captions(torch.tensor([2]), torch.tensor([0.25])) == ["2 · 25%"]
    with pytest.raises(ValueError, match="2 classes but 1"):
        prediction_captions([1, 2], [0.5])


def test_bn_loss_curve_grows_into_a_fixed_log_axis_with_batch_lines():
    steps, losses = [1, 2, 3, 4, 5], [8.0, 4.0, 2.0, 1.0, 0.5]
    fig = bn_loss_figure(steps, losses, total_steps=12, batch_steps=4)
    assert list(fig.data[0].x) == steps and list(fig.data[0].y) == losses
    assert fig.layout.yaxis.type == "log" and list(fig.layout.xaxis.range) == [0, 13]
    # a new batch starts after steps 4 and 8
    assert sorted(s.x0 for s in fig.layout.shapes) == [4.5, 8.5]
    one_batch = bn_loss_figure(steps, losses, total_steps=5, batch_steps=5)
    assert len(one_batch.layout.shapes) == 0
    assert "no distillation steps" in bn_loss_figure([], []).layout.annotations[0].text


def test_blocks_figure_keeps_every_block_on_the_axis():
    names = ["stem", "layer1.0", "layer2.0", "fc"]
    units = [{"name": "stem", "start_rel_error": 0.1, "rel_error": 0.01},
             {"name": "layer1.0", "start_rel_error": 0.2, "rel_error": 0.05}]
    fig = blocks_figure(units, names)
    assert [t.name for t in fig.data] == ["round to nearest", "Genie-M"]
    assert list(fig.data[0].y) == [0.1, 0.2] and list(fig.data[1].y) == [0.01, 0.05]
    assert list(fig.layout.xaxis.categoryarray) == names and fig.layout.yaxis.type == "log"
    assert "2 of 4 blocks" in fig.layout.title.text
    assert "all 2 blocks" in blocks_figure(units).layout.title.text
    assert "waiting" in blocks_figure([]).layout.annotations[0].text


def test_tiles_match_the_grid_picture():
    x = torch.randn(5, 1, 4, 4)
    tiles = image_tiles(x, upscale=2)
    assert len(tiles) == 5 and tiles[0].shape == (8, 8, 3) and tiles[0].dtype == np.uint8
    grid = image_grid(x, nrow=5, pad=1, upscale=2)
    for i, t in enumerate(tiles):     # tile i sits at column i of the one-row grid, after a 1-pixel border
        assert np.array_equal(t[:, :, 0], grid[1:9, 1 + i * 9: 9 + i * 9, 0])
        assert t.min() == 0 and t.max() == 255          # each stretched to its own range
    with pytest.raises(ValueError, match="expected images"):
        image_tiles(torch.zeros(2, 2, 4, 4))
