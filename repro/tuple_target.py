"""Per-sample weights carried in the target, (x, (y, w)), with a task's weighted loss: training works, but
validation took the loss in float64 by calling target.is_floating_point() on the tuple and failed."""
import tempfile
import torch
from torch import nn
from torch.utils.data import Dataset
import ddptrain
from ddptrain.config import from_dict
from ddptrain.dist import detect
from ddptrain.trainer import run


class Weighted(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x, self.w = torch.randn(n, 4, generator=g), torch.rand(n, 1, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], (self.y[i], self.w[i])


def weighted_mse(out, target):
    y, w = target
    return (w * (out - y) ** 2).mean()


def task(cfg):
    torch.manual_seed(cfg.seed)
    return ddptrain.Task(model=nn.Linear(4, 1), train=Weighted(32, 0), val=Weighted(13, 1), loss=weighted_mse)


if __name__ == "__main__":
    cfg = from_dict({"runs_dir": tempfile.mkdtemp(), "task": "tuple_target:task", "data": {"batch_size": 8},
                     "train": {"epochs": 1}, "checkpoint": {"every_epochs": 0, "save_best": False}})
    try:
        print("val", run(cfg, detect({}))["val"])
    except Exception as e:
        print(type(e).__name__, e)
