"""Perplexity of a causal LM over fixed token windows."""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from .errors import Cancelled


@torch.no_grad()
def loss_sums(model, windows: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 4,
              progress=None, cancel=None) -> tuple[float, int]:
    """Summed next-token loss over all windows (each window scored on its own) and the token count.

    ``cancel`` (anything with ``is_set()``) stops it between batches with ``Cancelled``; ``progress(done,
    total)`` is called with the windows scored, at 0 and after each batch.
    """
    model.to(device)
    total, count = 0.0, 0
    if progress is not None:   # at 0 first: the first batch alone can take seconds
        progress(0, windows.shape[0])
    for i in range(0, windows.shape[0], batch_size):
        if cancel is not None and cancel.is_set():
            raise Cancelled("run cancelled during evaluation")
        ids = windows[i:i + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
        if progress is not None:
            progress(min(i + batch_size, windows.shape[0]), windows.shape[0])
    return total, count


def perplexity(model, windows: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 4,
               progress=None, cancel=None, ranks=None, pool=None) -> float:
    """exp of the mean next-token loss over all windows; with data-parallel ``ranks`` each rank
    scores its share and the sums are added up. A streamed model (``--offload disk``) walks the
    windows block by block, its hidden states held in ``pool`` (see ``evaluate_streamed``)."""
    if hasattr(model, "loss_sums"):
        sums = lambda w: model.loss_sums(w, device, batch_size, progress, cancel, pool)  # noqa: E731
    else:
        sums = lambda w: loss_sums(model, w, device, batch_size, progress, cancel)  # noqa: E731
    if ranks is not None and ranks.active:
        total, count = sums(ranks.share(windows, batch_size))
        total, count = ranks.sum_numbers(total, count)
    else:
        total, count = sums(windows)
    mean = total / count
    # a loss past ~709 nats overflows exp: the perplexity is then infinite, which the report says, not a crash
    return math.exp(mean) if mean < math.log(sys.float_info.max) else float("inf")
