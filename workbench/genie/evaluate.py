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


@torch.no_grad()
def predictions(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 512,
                device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The class ``model`` predicts for each image of ``x`` and its softmax probability (on the CPU)."""
    was_training = model.training
    model.eval()
    classes, confidence = [], []
    for i in range(0, len(x), batch_size):
        p = torch.softmax(model(x[i:i + batch_size].to(device)).float(), dim=1).cpu()
        top = p.max(dim=1)
        classes.append(top.indices)
        confidence.append(top.values)
    model.train(was_training)
    if not classes:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(classes), torch.cat(confidence)
