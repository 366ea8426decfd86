"""The activation-outlier picture: per input channel, the largest |x| a layer sees, before and after rotation.

Outlier channels (a few channels of the residual stream hundreds of times larger than the rest)
are what makes per-token activation grids coarse; a rotation spreads them over all channels. The
"after" input is what the rotated model's matmul reads: for ``o``/``down`` after their online
transform.
"""
from __future__ import annotations

import copy

import torch

from ..errors import WorkbenchError
from ..models.loading import LoadedModel
from ..rotate import check_rotatable, rotate_model
from ..transformed import online_only


@torch.no_grad()
def input_channel_max(model, family, block: int, kind: str, ids: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """max over tokens of |x| per input channel of linear ``kind`` in ``block``, over the windows ``ids``."""
    blocks = family.blocks(model)
    if not 0 <= block < len(blocks):
        raise WorkbenchError(f"block {block} does not exist; the model has blocks 0 to {len(blocks) - 1}")
    if kind not in family.linears:
        raise WorkbenchError(f"layer kind {kind!r} is not one of {', '.join(family.linears)}")
    layer = family.linear(blocks[block], kind)
    found = torch.zeros(layer.in_features)

    def hook(module, args):
        x = online_only(module, args[0]).detach().float()
        found.copy_(torch.maximum(found, x.abs().reshape(-1, x.shape[-1]).amax(0).cpu()))

    handle = layer.register_forward_pre_hook(hook)
    try:
        for i in range(0, ids.shape[0], batch_size):
            model(ids[i:i + batch_size], use_cache=False)
    finally:
        handle.remove()
    return found


def outliers_before_after(loaded: LoadedModel, block: int, kind: str, ids: torch.Tensor, rotate: str = "hadamard",
                          seed: int = 0, batch_size: int = 4, in_place: bool = False) -> dict:
    """``{"before": ..., "after": ..., "rotation": ...}``: channel maxima of the model and of a rotated copy
    (``in_place``: the model itself is rotated, for a caller that holds a copy already)."""
    check_rotatable(loaded.family)
    before = input_channel_max(loaded.model, loaded.family, block, kind, ids, batch_size)
    rotated = loaded.model if in_place else copy.deepcopy(loaded.model)
    sizes = rotate_model(rotated, loaded.family, rotate, seed)
    after = input_channel_max(rotated, loaded.family, block, kind, ids, batch_size)
    return {"before": before, "after": after, "rotation": sizes}
