"""The image generator of Genie-D: latent vectors -> images, upsampling twice."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Generator(nn.Module):
    """linear -> (upsample, conv, BN, LeakyReLU) x 2 -> conv -> tanh -> BN without affine.

    The last BN fixes the batch's per-channel mean and variance (0, 1), the statistics of the
    normalized inputs the model was trained on; the teacher's BN layers set the rest. Its own BN
    layers always use batch statistics: the generator only exists during distillation.
    """

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], width: int = 64):
        super().__init__()
        self.image_shape = tuple(image_shape)
        c, h, w = self.image_shape
        self.h0, self.w0 = math.ceil(h / 4), math.ceil(w / 4)
        self.width = width
        self.fc = nn.Linear(latent_dim, width * self.h0 * self.w0)
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width // 2, 3, 1, 1), nn.BatchNorm2d(width // 2), nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, c, 3, 1, 1), nn.Tanh(),
            nn.BatchNorm2d(c, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(len(z), self.width, self.h0, self.w0)
        x = self.body(x)
        if x.shape[-2:] != self.image_shape[1:]:
            x = F.interpolate(x, size=self.image_shape[1:], mode="bilinear", align_corners=False)
        return x
