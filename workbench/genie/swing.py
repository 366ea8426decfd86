"""Swing convolution: random shifts of the sampling grid of strided convolutions.

A stride-s convolution only ever samples every s-th position, so images optimized through it can
hide energy in the positions it skips (aliasing, checkerboards). During distillation the input
of every strided convolution is padded by reflection and cropped back at a random offset, which
moves the sampling grid each step; output shapes do not change.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swing_shift(x: torch.Tensor, pad: int, dy: int, dx: int) -> torch.Tensor:
    """Reflect-pad ``x`` by ``pad`` and crop the original size at offset (dy, dx) in [0, 2 pad]."""
    h, w = x.shape[-2:]
    # reflection needs pad < size; tiny maps fall back to replicate
    mode = "reflect" if pad < min(h, w) else "replicate"
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    return padded[..., dy:dy + h, dx:dx + w]


def strided_convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]


class SwingConv:
    """While active, every strided Conv2d of ``model`` sees a randomly shifted input.

    The shift range is stride - 1 pixels each way (a shift by a whole stride only relabels the
    output positions).
    """

    def __init__(self, model: nn.Module, generator: torch.Generator | None = None, enabled: bool = True):
        self.convs = strided_convs(model) if enabled else []
        self.generator = generator
        self._handles = []

    def _hook(self, conv, args):
        pad = max(conv.stride) - 1
        dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=self.generator).tolist()
        return (swing_shift(args[0], pad, dy, dx),) + tuple(args[1:])

    def __enter__(self):
        self._handles = [c.register_forward_pre_hook(self._hook) for c in self.convs]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
