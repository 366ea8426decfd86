"""Perplexity of a streamed model: the windows walk the blocks one block at a time.

The windows are batched as ``evaluate.loss_sums`` batches them, and every block is called with
exactly the arguments the model's own forward gives it (the attention mask, positions and rotary
tables are caught at the first block, as the engine catches its inputs), so the hidden states are
the ones an in-memory forward computes. Each block is read from disk once for all windows; the
hidden states between blocks sit in an ``ActivationPool`` (in memory up to its bound, on disk
beyond). The head's logits are made a slice of tokens at a time when a batch's would be larger
than ``LOGIT_BUDGET``: with a large vocabulary they are the largest tensor of the evaluation. A
batch that fits is scored exactly as in memory; a sliced one sums its losses in another order,
which moves the perplexity in its last bits only.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ActivationPool
from .errors import Cancelled

LOGIT_BUDGET = 64 * 2 ** 20      # bytes of float32 logits made at once


class _Catch(Exception):
    pass


class _CallCatcher(nn.Module):
    """Stands in for the first block: keeps its input and the arguments the model calls it with."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        self.caught = None

    def forward(self, hidden_states, *args, **kwargs):
        self.caught = (hidden_states, args, kwargs)
        raise _Catch


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _check(cancel):
    if cancel is not None and cancel.is_set():
        raise Cancelled("run cancelled during evaluation")


def _on(module: nn.Module, device: torch.device) -> nn.Module:
    """The loaded module itself on the CPU; a copy elsewhere (moving it would move every view's)."""
    return module if device.type == "cpu" else copy.deepcopy(module).to(device)


def batch_loss(finals: list[nn.Module], head: nn.Module, h: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token loss of one batch from the last block's output ``h``."""
    for m in finals:
        h = m(h)
    vocab = head.out_features
    if ids.numel() * vocab * 4 <= LOGIT_BUDGET:      # as ``evaluate.loss_sums`` computes it
        logits = head(h)[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="sum").item()
    rows = h[:, :-1].reshape(-1, h.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    step = max(1, LOGIT_BUDGET // (vocab * 4))
    total = 0.0
    for i in range(0, rows.shape[0], step):
        logits = head(rows[i:i + step]).float()
        total += F.cross_entropy(logits, targets[i:i + step], reduction="sum").item()
    return total


@torch.no_grad()
def streamed_loss_sums(model, windows: torch.Tensor, device="cpu", batch_size: int = 4, progress=None,
                       cancel=None, pool: ActivationPool | None = None) -> tuple[float, int]:
    """Summed next-token loss over ``windows`` and the token count, as ``evaluate.loss_sums``."""
    device = torch.device(device)
    pool = pool or ActivationPool()
    view = model.view(model.packed)        # its own modules: the catcher is swapped into them only
    family = model.family
    blocks = family.blocks(view.skeleton)
    catcher = _CallCatcher(blocks[0])
    blocks[0] = catcher
    hidden, calls, batches = pool.new_list(), [], []
    try:
        for i in range(0, windows.shape[0], batch_size):
            _check(cancel)
            ids = windows[i:i + batch_size]
            try:
                view.skeleton(ids, use_cache=False)
            except _Catch:
                h, args, kwargs = catcher.caught
                hidden.append(h)
                calls.append((args, kwargs))
                batches.append(ids)
    finally:
        blocks[0] = catcher.block
        catcher.caught = None
    steps, done = (len(blocks) + 1) * len(batches), 0
    for b in range(len(blocks)):
        block = view.block(b, device)
        out = pool.new_list()
        for i in range(len(batches)):
            _check(cancel)
            args, kwargs = _to(calls[i], device)
            h = block(hidden[i].to(device), *args, **kwargs)
            out.append((h[0] if isinstance(h, tuple) else h).cpu())
            done += 1
            if progress is not None:
                progress(done, steps)
        hidden.release()
        hidden = out
        del block
    finals = [_on(m, device) for m in family.finals(view.skeleton)]
    head = _on(view.skeleton.get_output_embeddings(), device)
    total, count = 0.0, 0
    for i, ids in enumerate(batches):
        _check(cancel)
        ids = ids.to(device)
        total += batch_loss(finals, head, hidden[i].to(device), ids)
        count += ids[:, 1:].numel()
        done += 1
        if progress is not None:
            progress(done, steps)
    hidden.release()
    return total, count
