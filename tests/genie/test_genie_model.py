import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from workbench.errors import WorkbenchError
from workbench.figures.genie import accuracy_table_figure, samples_figure
from workbench.genie.data import DigitsConfig, load_digits_split, real_calibration
from workbench.genie.evaluate import accuracy
from workbench.genie.model import DEFAULT_META, DEFAULT_WEIGHTS, load_default_model
from workbench.genie.png import encode_png, image_grid, write_png


def test_default_assets_reach_recorded_accuracy():
    model, info = load_default_model()
    assert info == json.loads(DEFAULT_META.read_text())
    assert info["test_accuracy"] >= 97.0
    split = load_digits_split(DigitsConfig(**info["data"]))
    assert len(split.x_test) == info["n_test"] and len(split.x_train) == info["n_train"]
    assert split.mean == pytest.approx(info["normalization"]["mean"], rel=1e-5)
    assert accuracy(model, split.x_test, split.y_test) == pytest.approx(info["test_accuracy"], abs=0.3)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 1 + 2 * 3 + 2


def test_split_is_fixed_and_stratified():
    a, b = load_digits_split(), load_digits_split()
    assert torch.equal(a.x_test, b.x_test) and a.x_test.shape[1:] == (1, 16, 16)
    counts = torch.bincount(a.y_test, minlength=10)
    assert int(counts.min()) >= 35
    x = real_calibration(a, 32, seed=1)
    assert x.shape == (32, 1, 16, 16) and torch.equal(x, real_calibration(a, 32, seed=1))
    with pytest.raises(WorkbenchError, match="real training images"):
        real_calibration(a, 10_000)


def test_missing_weights_name_the_training_script(tmp_path):
    with pytest.raises(WorkbenchError, match="workbench.genie.train"):
        load_default_model(tmp_path / "missing.safetensors")
    assert DEFAULT_WEIGHTS.exists()


def test_png_encoder_without_pillow_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    for pixels in (rng.integers(0, 256, (7, 5), dtype=np.uint8), rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)):
        path = tmp_path / "x.png"
        path.write_bytes(encode_png(pixels))
        assert np.array_equal(np.asarray(Image.open(path)), pixels)
    write_png(tmp_path / "y.png", pixels)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "y.png")), pixels)


def test_image_grid_layout():
    imgs = torch.stack([torch.full((1, 2, 2), float(i)) for i in range(5)]) + torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    grid = image_grid(imgs, nrow=3, pad=1)
    assert grid.shape == (2 * 3 + 1, 3 * 3 + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 2, 0] == 255          # each tile stretched to its own range
    assert grid[0, 0, 0] == 255                                    # border


def test_figures():
    fig = samples_figure(torch.randn(6, 1, 8, 8), nrow=3, upscale=2)
    z = np.asarray(fig.data[0].z)
    assert fig.data[0].type == "image" and z.shape == (2 * 17 + 1, 3 * 17 + 1, 3)
    table = accuracy_table_figure([{"setting": "W4A4", "RTN": 98.5, "Genie": 99.72}, {"setting": "W2", "RTN": None}])
    cells = table.data[0].cells.values
    assert list(table.data[0].header.values) == ["setting", "RTN", "Genie"]
    assert list(cells[1]) == ["98.50", ""] and list(cells[2]) == ["99.72", ""]
