"""Top-1 accuracy of a classifier on a tensor dataset."""
from __future__ import annotations

import torch


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512,
             device: str | torch.device = "cpu") -> float:
    """Percent of ``x`` classified as ``y``; the model is evaluated in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[i:i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / max(len(x), 1)
