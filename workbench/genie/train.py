"""Train the default digits CNN: ``python -m workbench.genie.train [--epochs N] [--out PATH]``.

Writes the weights (safetensors) and, beside them, a JSON with the test accuracy, the training
settings and the input normalization, so the shipped asset is reproducible from this script.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import DigitsConfig, load_digits_split
from .evaluate import accuracy
from .model import DEFAULT_WEIGHTS, DigitsResNet, ModelConfig, model_config_to_json


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    max_shift: int = 2             # random translation in pixels of the 16x16 image
    seed: int = 0


def random_shift(x: torch.Tensor, max_shift: int, background: float, g: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=background)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=g)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train(cfg: TrainConfig = TrainConfig(), model_cfg: ModelConfig = ModelConfig(),
          data_cfg: DigitsConfig = DigitsConfig(), device: str = "cpu", log=print):
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    split = load_digits_split(data_cfg)
    background = -split.mean / split.std            # a blank pixel after normalization
    model = DigitsResNet(model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * ((len(split.x_train) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(split.x_train), generator=g)
        total = 0.0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x = random_shift(split.x_train[idx], cfg.max_shift, background, g).to(device)
            loss = F.cross_entropy(model(x), split.y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if log and (epoch % 10 == 9 or epoch == cfg.epochs - 1):
            log(f"epoch {epoch + 1}: train loss {total / len(perm):.4f}, "
                f"test accuracy {accuracy(model, split.x_test, split.y_test, device=device):.2f}%")
    model.eval()
    info = {
        "test_accuracy": accuracy(model, split.x_test, split.y_test, device=device),
        "train_accuracy": accuracy(model, split.x_train, split.y_train, device=device),
        "n_train": len(split.x_train), "n_test": len(split.x_test),
        "train": asdict(cfg), "data": asdict(data_cfg), "model": model_config_to_json(model_cfg),
        "normalization": {"mean": split.mean, "std": split.std},
        "train_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    return model.cpu(), info


def save(model: torch.nn.Module, info: dict, weights: Path) -> None:
    """Weights and metadata, each written to a temp file and renamed (never half-written)."""
    from safetensors.torch import save_file
    weights = Path(weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    meta = weights.with_suffix(".json")
    tmp_w, tmp_m = weights.with_suffix(".safetensors.tmp"), meta.with_suffix(".json.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_w))
    tmp_m.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp_w, weights)
    os.replace(tmp_m, meta)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="train the default digits CNN for genie")
    d = TrainConfig()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(DEFAULT_WEIGHTS), help="weights path; the JSON goes beside it")
    a = p.parse_args(argv)
    model, info = train(TrainConfig(epochs=a.epochs, lr=a.lr, seed=a.seed), device=a.device)
    save(model, info, Path(a.out))
    print(f"test accuracy {info['test_accuracy']:.2f}% -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
