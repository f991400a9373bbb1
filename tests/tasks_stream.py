"""Test tasks whose data are streams (IterableDataset): numbered regression items, read from "files" (ranges
of ids) split with ddptrain.shard, or item by item by ddptrain; with or without a state for resuming.

Item i is (x, y) with x = [i, f1, f2, f3]: the model ignores column 0, which lets a test hook read the ids.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import IterableDataset

import ddptrain

MODELS: list[nn.Module] = []
FEATURES = torch.randn(4096, 3, generator=torch.Generator().manual_seed(0))
TARGETS = FEATURES @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1


class Numbered(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x[:, 1:])


def item(i: int):
    return torch.cat([torch.tensor([float(i)]), FEATURES[i % 4096]]), TARGETS[i % 4096]


class Items(IterableDataset):
    """ids first .. first + n - 1, in order, split by ddptrain item by item."""

    def __init__(self, n: int, first: int = 0):
        self.n, self.first = n, first

    def __iter__(self):
        for i in range(self.first, self.first + self.n):
            yield item(i)


class SlowItems(Items):
    """Items, each read in `delay` seconds."""

    def __init__(self, n: int, delay: float):
        super().__init__(n)
        self.delay = delay

    def __iter__(self):
        import time
        for x in super().__iter__():
            time.sleep(self.delay)
            yield x


class Files(IterableDataset):
    """"Files" of ids (their lengths given), split over ranks and workers with ddptrain.shard."""

    def __init__(self, lengths: list[int], first: int = 0):
        starts = [first + sum(lengths[:j]) for j in range(len(lengths))]
        self.files = list(zip(starts, lengths))

    def __iter__(self):
        for start, length in ddptrain.shard(self.files):
            for i in range(start, start + length):
                yield item(i)


class NoisyFiles(Files):
    """Files whose features get noise from torch's global RNG as they are read (augmentation, in the main
    process when there are no workers): the reads' draws must not depend on how far ahead the loop reads."""

    def __iter__(self):
        for x, y in super().__iter__():
            yield torch.cat([x[:1], x[1:] + 0.01 * torch.randn(3)]), y


class StatefulFiles(Files):
    """Files with a state: (files of this part done, items of the next done), so a resume reads no item twice."""

    def __init__(self, lengths, first=0):
        super().__init__(lengths, first)
        self.done, self.start = (0, 0), (0, 0)

    def __iter__(self):
        (files_done, offset), self.start = self.start, (0, 0)
        for j, (start, length) in enumerate(ddptrain.shard(self.files)):
            if j < files_done:
                continue
            for o in range(offset if j == files_done else 0, length):
                self.done = (j, o + 1)
                yield item(start + o)

    def state_dict(self):
        return {"files_done": self.done[0], "offset": self.done[1]}

    def load_state_dict(self, state):
        self.start = self.done = (state["files_done"], state["offset"])


class SizedItems(Items):
    def __len__(self):
        return self.n


def stream(cfg):
    """task_args: kind: items (split by ddptrain), files (ddptrain.shard), noisy (files with noise drawn as read), stateful (files with a state) or
    sized (items with a __len__) or slow (items, each read in task_args.delay seconds); lengths of the files (12 of 16);
    val_n: validation and test items (none)."""
    kind, lengths = cfg.task_args.get("kind", "files"), cfg.task_args.get("lengths", [16] * 12)
    val_n = cfg.task_args.get("val_n", 0)
    torch.manual_seed(cfg.seed)
    train = {"items": lambda: Items(sum(lengths)), "files": lambda: Files(list(lengths)),
             "noisy": lambda: NoisyFiles(list(lengths)),
             "stateful": lambda: StatefulFiles(list(lengths)), "sized": lambda: SizedItems(sum(lengths)),
             "slow": lambda: SlowItems(sum(lengths), cfg.task_args.get("delay", 0.01))}[kind]()
    model = Numbered()
    MODELS.append(model)
    val = Items(val_n, first=sum(lengths)) if val_n else None
    return ddptrain.Task(model=model, train=train, val=val, test=val, loss=nn.functional.mse_loss)


class NotAStream(torch.utils.data.Dataset):
    """What a new user might write: a Dataset with __iter__ instead of IterableDataset."""

    def __len__(self):
        return 10

    def __iter__(self):
        yield from (item(i) for i in range(10))


def not_a_stream(cfg):
    return ddptrain.Task(model=Numbered(), train=NotAStream(), loss=nn.functional.mse_loss)
