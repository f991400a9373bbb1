"""Tiny tasks for the numerics hunt."""
import torch
from torch import nn
from torch.utils.data import TensorDataset
from ddptrain import Task
from ddptrain.losses import squared_error

MODELS = []


class Net(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 1)
        if a.get("frozen"):
            self.mid.requires_grad_(False)
        if a.get("unused"):
            self.spare = nn.Linear(16, 16)
        if a.get("tied"):
            self.back = nn.Linear(16, 16)
            self.back.weight = self.mid.weight

    def forward(self, x):
        h = torch.tanh(self.norm(self.inp(x)))
        h = torch.tanh(self.mid(h))
        if hasattr(self, "back"):
            h = torch.tanh(self.back(h))
        return self.out(h)


def regression(cfg):
    a = cfg.task_args
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(96 + 32, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(len(x), 1, generator=g)
    torch.manual_seed(cfg.seed)
    model = Net(a)
    MODELS.append(model)
    return Task(model=model, train=TensorDataset(x[:96], y[:96]), val=TensorDataset(x[96:], y[96:]),
                loss=nn.functional.mse_loss, metrics={"mse": squared_error, "score": lambda out, y: -squared_error(out, y)})
