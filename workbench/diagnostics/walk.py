"""Walk one or more models of the same family block by block, stage by stage, in lockstep.

The family's ``block_forward`` generators pause before every stage (the linears that read
one input), which is exactly where diagnostics look: at the stage input and at what the
layers of the stage make of it. Each model carries its own hidden stream, so a quantized
model sees its own accumulated error while the full-precision one stays clean.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..engine import advance_stages, block_inputs, to_device
from ..errors import Cancelled
from ..models import Family, Stage
from ..models.streamed import is_streamed


@dataclass
class StageView:
    block: int
    kinds: tuple[str, ...]
    blocks: list[nn.Module]          # block ``block`` of every model, on the device
    stages: list[list[Stage]]        # stages[model][batch]
    ctx: object                      # the family's per-sequence context (RoPE tables), on the device


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def on_device(block: nn.Module, device: torch.device) -> nn.Module:
    """``block`` itself when it already lives on ``device``, else a copy there.

    The walked models are often shared (the app's cached model): moving their blocks and back would
    leave a block split across devices when the move fails half-way (an out-of-memory), or lost on a
    device it cannot come back from. A copy costs one block of memory and touches nothing shared.
    """
    def there(t):
        return t.device.type == device.type and (device.index is None or t.device.index == device.index)

    if all(there(t) for t in itertools.chain(block.parameters(), block.buffers())):
        return block
    return copy.deepcopy(block).to(device)


def block_count(model: nn.Module, family: Family, max_blocks: int | None) -> int:
    n = len(family.blocks(model))
    return n if max_blocks is None else min(max_blocks, n)


@torch.no_grad()
def walk_stages(models: list[nn.Module], family: Family, ids: torch.Tensor, *, batch_size: int = 4,
                device: torch.device | str = "cpu", max_blocks: int | None = None,
                on_block=None, cancel=None) -> Iterator[StageView]:
    """Yield a ``StageView`` before every stage of the first ``max_blocks`` blocks.

    Only the current block of each model is on ``device`` (a copy, when the model lives elsewhere:
    the models are never moved), so a model that does not fit on the device can still be walked. ``on_block(b, outputs)`` gets
    every model's block outputs (list per model of per-batch tensors) when block ``b`` ends.
    ``cancel`` (anything with ``is_set()``) stops the walk before a block with ``Cancelled``.
    """
    device = torch.device(device)
    captured = [block_inputs(m, family, ids.to(_model_device(m)), batch_size) for m in models]
    # the context (RoPE tables) is computed where the model lives, then moved with the stream
    ctx = to_device(family.context(models[0], captured[0][0]), device)
    hidden = [[h.to(device) for h in hs] for hs in captured]
    del captured
    for b in range(block_count(models[0], family, max_blocks)):
        if cancel is not None and cancel.is_set():
            raise Cancelled("run cancelled")
        # a streamed model's block is read from its checkpoint (``--offload disk``; pass a ``view()`` of a shared one)
        blocks = [m.block(b, device) if is_streamed(m) else on_device(family.blocks(m)[b], device) for m in models]
        gens = [[family.block_forward(blk, h, ctx) for h in hs] for blk, hs in zip(blocks, hidden)]
        while True:
            advanced = [advance_stages(g) for g in gens]
            if advanced[0][0] is None:
                hidden = [outs for _, outs in advanced]
                break
            stages = [s for s, _ in advanced]
            if cancel is not None and cancel.is_set():   # a stage of a large model takes a while too
                raise Cancelled("run cancelled")
            yield StageView(b, stages[0][0].kinds, blocks, stages, ctx)
        del blocks, gens
        if on_block is not None:
            on_block(b, hidden)
