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
        self.cfg = cfg
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


def infer_digits_config(state: dict) -> ModelConfig:
    """The ``ModelConfig`` whose ``DigitsResNet`` has the parameter shapes of ``state``.

    A safetensors file carries no architecture settings; the shapes of the stem, the first conv
    of each stage and the classifier pin them down.
    """
    need = ["stem.0.weight", "fc.weight"] + [f"layer{i}.0.conv1.weight" for i in (1, 2, 3)]
    missing = [k for k in need if k not in state]
    if missing:
        raise WorkbenchError(f"the weights are not a digits-resnet: {', '.join(missing)} missing; give weights "
                             f"saved from workbench.genie.DigitsResNet, or the architecture they were trained as")
    blocks = len({k.split(".")[1] for k in state if k.startswith("layer1.")})
    return ModelConfig(widths=tuple(int(state[f"layer{i}.0.conv1.weight"].shape[0]) for i in (1, 2, 3)),
                       blocks_per_stage=blocks, in_channels=int(state["stem.0.weight"].shape[1]),
                       num_classes=int(state["fc.weight"].shape[0]))


def _digits_resnet(state: dict, info: dict) -> nn.Module:
    cfg = model_config_from_json(info["model"]) if "model" in info else infer_digits_config(state)
    return DigitsResNet(cfg)


# The architectures a safetensors file may be loaded as, by name: (state dict, metadata) -> model.
# Genie evaluates on the digits test split, so each takes the digits' 16x16 grayscale inputs.
ARCHITECTURES = {"digits-resnet": _digits_resnet}
DEFAULT_ARCHITECTURE = "digits-resnet"


def check_architecture(name: str) -> str:
    if name not in ARCHITECTURES:
        raise WorkbenchError(f"unknown CNN architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return name


def load_cnn(weights: Path | str = DEFAULT_WEIGHTS, architecture: str = DEFAULT_ARCHITECTURE,
             device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A CNN from a safetensors file, as ``architecture``, in eval mode, and its metadata.

    The metadata is the JSON beside the weights when there is one (what ``workbench.genie.train``
    writes: test accuracy, model and data settings); without it the model settings are read from
    the weights' shapes and the data settings are the defaults. Safetensors holds tensors only, so
    loading runs no code from the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    check_architecture(architecture)
    weights = Path(weights).expanduser()
    if weights == DEFAULT_WEIGHTS and not weights.exists():
        return load_default_model(weights, device=device)       # its message says how to make it
    if not weights.is_file():
        what = "is a directory" if weights.is_dir() else "not found"
        raise WorkbenchError(f"genie model {weights} {what}; give a .safetensors file of a CNN with BatchNorm")
    meta = weights.with_suffix(".json")
    try:
        info = json.loads(meta.read_text()) if meta.is_file() else {}
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"{meta.name} beside the weights is not readable JSON ({exc}); fix or remove it") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WorkbenchError(f"{weights.name} is not a safetensors file ({exc}); give weights saved with "
                             "safetensors") from None
    model = ARCHITECTURES[architecture](state, info)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = str(exc).split(":", 1)[-1].strip().splitlines()[0]
        raise WorkbenchError(f"{weights.name} does not hold {architecture} weights ({detail}); give the "
                             f"architecture the weights were trained as") from None
    info = {"model": model_config_to_json(model.cfg)} | info if hasattr(model, "cfg") else info
    return model.to(device).eval(), info
