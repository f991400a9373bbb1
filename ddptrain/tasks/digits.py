"""Handwritten digits (8x8 images, 10 classes, 1,797 samples) classified by the built-in MLP."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from ..config import Config
from ..data import check_fractions, split
from ..losses import accuracy
from ..models import mlp
from ..task import Task


def standardised_splits(x: torch.Tensor, y: torch.Tensor, cfg: Config, per_feature: bool = True) -> list[TensorDataset]:
    """Seeded train/val/test split, inputs standardised with statistics of the training part only.

    per_feature=False uses one mean and std for all features: right for pixels, where a pixel that is
    (almost) always blank in training would otherwise be blown up wherever it is not.
    """
    check_fractions(cfg.data, len(x))
    parts = split(TensorDataset(x, y), [cfg.data.val_fraction, cfg.data.test_fraction], cfg.data.split_seed)
    train_x = x[torch.tensor(parts[0].indices, dtype=torch.long)]
    if per_feature:
        mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    else:
        mean, std = train_x.mean(), train_x.std()
    x = (x - mean) / std
    return [TensorDataset(x[torch.tensor(p.indices, dtype=torch.long)], y[torch.tensor(p.indices, dtype=torch.long)])
            for p in parts]


def build(cfg: Config) -> Task:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    train, val, test = standardised_splits(x, y, cfg, per_feature=False)
    return Task(model=mlp(64, 10, cfg.model), train=train, val=val or None, test=test or None,
                loss=torch.nn.functional.cross_entropy, metrics={"accuracy": accuracy})
