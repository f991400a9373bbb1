"""Small deterministic tasks for the tests: no dropout, so runs differ only through what is tested."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ddptrain import Task
from ddptrain.losses import squared_error

MODELS: list[nn.Module] = []  # the models built in this process, so a test can read the trained weights


def regression(cfg) -> Task:
    """y = x @ w + noise on 8 features; sizes from task_args (n_train, n_val, n_test)."""
    a = cfg.task_args
    n_train, n_val, n_test = a.get("n_train", 96), a.get("n_val", 37), a.get("n_test", 0)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n_train + n_val + n_test, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(len(x), 1, generator=g)
    width = a.get("width", 16)
    layers = [nn.Linear(8, width)]
    if a.get("batch_norm"):
        layers.append(nn.BatchNorm1d(width))
    layers.append(nn.Tanh())
    if a.get("dropout"):
        layers.append(nn.Dropout(a["dropout"]))
    model = nn.Sequential(*layers, nn.Linear(width, 1))
    MODELS.append(model)
    if a.get("compiled"):  # a task that compiles its own model (its state dict's keys are prefixed _orig_mod.)
        model = torch.compile(model, backend="eager")

    def part(lo, hi):
        return TensorDataset(x[lo:hi], y[lo:hi]) if hi > lo else None

    train = part(0, n_train) if not a.get("augment") else Augmented(part(0, n_train))
    return Task(model=model, train=train, val=part(n_train, n_train + n_val),
                test=part(n_train + n_val, len(x)), loss=nn.functional.mse_loss, metrics={"mse": squared_error})


class Augmented(Dataset):
    """Random noise added to every input as it is loaded (in a DataLoader worker, from the worker's RNG)."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        x, y = self.inner[i]
        return x + 0.1 * torch.randn(x.shape), y


def classification(cfg) -> Task:
    """4 Gaussian blobs in 16 dimensions, an MLP classifier."""
    a = cfg.task_args
    g = torch.Generator().manual_seed(99)
    centers = 3 * torch.randn(4, 16, generator=g)
    y = torch.randint(0, 4, (a.get("n", 256),), generator=g)
    x = centers[y] + torch.randn(len(y), 16, generator=g)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    MODELS.append(model)
    n_val = len(y) // 4
    return Task(model=model, train=TensorDataset(x[n_val:], y[n_val:]), val=TensorDataset(x[:n_val], y[:n_val]),
                loss=nn.functional.cross_entropy,
                metrics={"accuracy": lambda out, t: (out.argmax(-1) == t).float()})


class Slow(Dataset):
    """Wraps a dataset; every item takes `delay` seconds (a slow evaluation, a stalled data pipeline)."""

    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        import time
        time.sleep(self.delay)
        return self.inner[i]


class Held(Dataset):
    """Wraps a dataset; items wait while the file `path` exists (at most 120 s), so a test decides how long a
    run lasts."""

    def __init__(self, inner, path):
        self.inner, self.path = inner, Path(path)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        import time
        deadline = time.monotonic() + 120
        while self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.inner[i]


def wrong_shapes(cfg) -> Task:
    """Inputs have 7 features but the model expects 8."""
    x, y = torch.randn(32, 7), torch.randn(32, 1)
    return Task(model=nn.Linear(8, 1), train=TensorDataset(x, y), loss=nn.functional.mse_loss)


def flat_targets(cfg) -> Task:
    """Targets of shape (N,) against model outputs of shape (N, 1): MSE would silently broadcast."""
    x, y = torch.randn(32, 8), torch.randn(32)
    return Task(model=nn.Linear(8, 1), train=TensorDataset(x, y), val=TensorDataset(x, y))


def raises_in_build(cfg) -> Task:
    raise FileNotFoundError("no data in /data/x")


def flat_targets_own_loss(cfg) -> Task:
    """As flat_targets, with the task's own MSE: it would broadcast silently."""
    task = flat_targets(cfg)
    task.loss = nn.functional.mse_loss
    return task


def batch_mean_metric(cfg) -> Task:
    task = regression(cfg)
    task.metrics = {"mse": lambda out, y: ((out - y) ** 2).mean()}  # a batch mean, not per-sample values
    return task


def metrics_as_list(cfg) -> Task:
    task = regression(cfg)
    task.metrics = [squared_error]  # not a dict of name -> metric
    return task


class RaisesInForward(nn.Linear):
    def forward(self, x):
        raise RuntimeError("no forward today")


def forward_raises(cfg) -> Task:
    task = regression(cfg)
    task.model = RaisesInForward(8, 1)
    return task


def label_out_of_range(cfg) -> Task:
    """A class index the 4-class model does not have, in the second batch (the two-sample check misses it)."""
    task = classification(cfg)
    x, y = task.train.tensors
    y = y.clone()
    y[70] = 9
    task.train = TensorDataset(x, y)
    return task


class Corrupt(Dataset):
    def __init__(self, inner, bad):
        self.inner, self.bad = inner, bad

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if i == self.bad:
            raise ValueError(f"sample {i} is corrupt")
        return self.inner[i]


def bad_sample(cfg) -> Task:
    task = classification(cfg)
    task.train = Corrupt(task.train, 41)
    return task


def optimizer_raises(cfg) -> Task:
    task = regression(cfg)

    def optimizer(groups):
        raise ValueError("no such optimizer setting")
    task.optimizer = optimizer
    return task


def first_sample_bad(cfg) -> Task:
    """The first training item raises: the pre-flight check reads it."""
    task = classification(cfg)
    task.train = Corrupt(task.train, 0)
    return task


def needs_missing_module(cfg) -> Task:
    import no_such_package  # noqa: F401


class KillOnce(Dataset):
    """On rank 1 of the first attempt only, SIGKILL the process after `after` items: a crash mid-run."""

    def __init__(self, inner, after):
        self.inner, self.after, self.fetched = inner, after, 0

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        import os
        import signal
        self.fetched += 1
        if (self.fetched > self.after and os.environ.get("RANK") == "1"
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner[i]


def regression_for_launch(cfg) -> Task:
    """regression(), with training items slowed by task_args.delay, held while the file task_args.hold_while
    exists and, with task_args.kill_after, a crash."""
    task = regression(cfg)
    if cfg.task_args.get("delay"):
        task.train = Slow(task.train, cfg.task_args["delay"])
    if cfg.task_args.get("hold_while"):
        task.train = Held(task.train, cfg.task_args["hold_while"])
    if cfg.task_args.get("kill_after"):
        task.train = KillOnce(task.train, cfg.task_args["kill_after"])
    return task


class WithUnused(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.unused = inner, nn.Linear(1, 1)

    def forward(self, x):
        return self.inner(x)


def unused_parameter(cfg) -> Task:
    """regression(), whose model holds a layer that takes no part in the loss."""
    task = regression(cfg)
    task.model = WithUnused(task.model)
    return task
