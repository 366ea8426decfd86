"""The default model: a ResNet in miniature for 16x16 digits, and loading its shipped weights."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WorkbenchError

ASSETS = Path(__file__).resolve().parents[2] / "assets"
DEFAULT_WEIGHTS = ASSETS / "genie_digits_cnn.safetensors"
DEFAULT_META = ASSETS / "genie_digits_cnn.json"


@dataclass(frozen=True)
class ModelConfig:
    widths: tuple = (16, 32, 64)   # channels of the three stages; stages 2 and 3 halve the size
    blocks_per_stage: int = 1
    in_channels: int = 1
    num_classes: int = 10


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        w = cfg.widths
        # stem as one Sequential so block-wise reconstruction sees conv, BN and ReLU together
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, w[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(w[0]), nn.ReLU())
        stages, c_in = [], w[0]
        for i, c in enumerate(w):
            blocks = [BasicBlock(c_in if j == 0 else c, c, 2 if (i > 0 and j == 0) else 1)
                      for j in range(cfg.blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            c_in = c
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[-1], cfg.num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def model_config_to_json(cfg: ModelConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def model_config_from_json(d: dict) -> ModelConfig:
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def load_default_model(weights: Path | str = DEFAULT_WEIGHTS, meta: Path | str | None = None,
                       device: str | torch.device = "cpu") -> tuple[DigitsResNet, dict]:
    """The shipped digits CNN in eval mode, and its metadata (accuracy, training settings)."""
    from safetensors.torch import load_file
    weights = Path(weights)
    meta = Path(meta) if meta is not None else weights.with_suffix(".json")
    if not weights.exists() or not meta.exists():
        raise WorkbenchError(f"default genie model not found at {weights} (and {meta.name}); "
                             f"run `python -m workbench.genie.train` to create it")
    info = json.loads(meta.read_text())
    model = DigitsResNet(model_config_from_json(info["model"]))
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval(), info
