"""Loss functions by name, and metrics whose global value does not depend on the world size.

A metric is either a plain function `(output, target) -> per-sample values`, reported as their mean
over all samples of all ranks, or an object with `batch_stats(output, target) -> 1-D tensor of sums`
and `compute(stats, count) -> float` for values that are not means (R^2). Either way evaluation only
all-reduces sums and counts, so sharding changes nothing.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .config import LossConfig


def build_loss(cfg: LossConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The named loss as a function (output, target) -> mean loss, or None for `task`."""
    if cfg.name == "cross_entropy":
        return lambda out, y: F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
    if cfg.name == "huber":
        return lambda out, y: F.huber_loss(out, y, delta=cfg.huber_delta)
    return {"mse": F.mse_loss, "l1": F.l1_loss, "bce_with_logits": F.binary_cross_entropy_with_logits,
            "task": None}[cfg.name]


ELEMENTWISE = {"mse", "l1", "huber", "bce_with_logits"}


class Metric(Protocol):
    width: int  # length of the batch_stats vector

    def batch_stats(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...
    def compute(self, stats: torch.Tensor, count: int) -> float: ...


class Mean:
    """Wraps a per-sample function: the metric is the mean of its values over all samples."""

    width = 1

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.fn = fn

    def batch_stats(self, output, target):
        values = self.fn(output, target)
        return values.reshape(values.shape[0], -1).double().mean(1).sum().reshape(1)

    def compute(self, stats, count):
        return float(stats[0] / max(count, 1))


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.argmax(-1) == target).float()


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.float() - target.float()) ** 2


def absolute_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.float() - target.float()).abs()


class R2:
    """Coefficient of determination, 1 - SSE/SST, from sums that add up across ranks."""

    width = 4

    def batch_stats(self, output, target):
        out, y = output.double().reshape(-1), target.double().reshape(-1)
        return torch.stack([((out - y) ** 2).sum(), y.sum(), (y ** 2).sum(), y.new_tensor(float(y.numel()))])

    def compute(self, stats, count):
        sse, s, s2, n = (float(v) for v in stats)
        sst = s2 - s * s / n
        return 1.0 - sse / sst if sst > 0 else float("nan")


def as_metric(m) -> Metric:
    return m if hasattr(m, "batch_stats") else Mean(m)


def metric_values(stats: torch.Tensor, metrics: dict) -> dict:
    """{'loss': ..., <metric>: ...} from summed stats laid out as [loss sum, count, metric stats...]."""
    stats = stats.cpu()
    count = int(stats[1])
    values, offset = {"loss": float(stats[0] / max(count, 1))}, 2
    for name, m in metrics.items():
        values[name] = m.compute(stats[offset:offset + m.width], count)
        offset += m.width
    return values
