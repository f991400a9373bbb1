"""Diabetes progression (442 patients, 10 features): MSE regression, reporting MSE, MAE and R^2."""
from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..losses import R2, absolute_error, squared_error
from ..models import mlp
from ..task import Task
from .digits import standardised_splits


class Rescale(nn.Module):
    """Maps the network's standardised output back to the target's units (fixed, not trained)."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x):
        return x * self.std + self.mean


def build(cfg: Config) -> Task:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32).unsqueeze(1)
    train, val, test = standardised_splits(x, y, cfg)
    y_train = train.tensors[1]
    model = nn.Sequential(mlp(10, 1, cfg.model), Rescale(float(y_train.mean()), float(y_train.std())))
    return Task(model=model, train=train, val=val or None, test=test or None, loss=nn.functional.mse_loss,
                metrics={"mse": squared_error, "mae": absolute_error, "r2": R2()})
