"""A regression task whose training items get random noise (augmentation) drawn in __getitem__."""
import torch
from torch import nn
from torch.utils.data import Dataset
from ddptrain import Task

class Noisy(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(8), self.y[i]

def build(cfg):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(96 + 32, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    return Task(model=model, train=Noisy(x[:96], y[:96]), val=torch.utils.data.TensorDataset(x[96:], y[96:]),
                loss=nn.functional.mse_loss)
