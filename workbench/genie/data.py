"""scikit-learn's digits (bundled, 8x8 grayscale), upsampled and normalized for the default CNN."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import WorkbenchError


@dataclass(frozen=True)
class DigitsConfig:
    image_size: int = 16          # 8x8 upsampled bilinearly; gives the strided convs room
    test_fraction: float = 0.2
    split_seed: int = 0


@dataclass
class DigitsSplit:
    x_train: torch.Tensor          # [n, 1, S, S], normalized with the train mean/std
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: float                    # pixel statistics of the train split in [0, 1] units
    std: float


def _to_images(flat: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(flat.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def load_digits_split(cfg: DigitsConfig = DigitsConfig()) -> DigitsSplit:
    """The fixed stratified train/test split every genie run and the training script share."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    if cfg.image_size < 8:
        raise WorkbenchError(f"image size must be at least 8 (the digits are 8x8), got {cfg.image_size}")
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(digits.data, digits.target, test_size=cfg.test_fraction,
                                              random_state=cfg.split_seed, stratify=digits.target)
    x_tr, x_te = _to_images(x_tr, cfg.image_size), _to_images(x_te, cfg.image_size)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    return DigitsSplit(x_train=(x_tr - mean) / std, y_train=torch.from_numpy(y_tr).long(),
                       x_test=(x_te - mean) / std, y_test=torch.from_numpy(y_te).long(),
                       mean=mean, std=std)


def real_calibration(split: DigitsSplit, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` train images drawn without replacement (few-shot calibration)."""
    if n > len(split.x_train):
        raise WorkbenchError(f"only {len(split.x_train)} real training images; ask for at most that many")
    g = torch.Generator().manual_seed(seed)
    return split.x_train[torch.randperm(len(split.x_train), generator=g)[:n]].clone()
