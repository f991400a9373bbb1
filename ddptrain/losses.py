"""Loss functions by name, and metrics whose global value does not depend on the world size.

A metric is either a plain function `(output, target) -> per-sample values`, reported as their mean
over all samples of all ranks, or an object with `batch_stats(output, target) -> 1-D tensor of sums`
and `compute(stats, count) -> float` for values that are not means (R^2). Either way training logs and
evaluation only all-reduce sums and counts (`Sums`), so sharding changes nothing.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .config import LossConfig


class CrossEntropy:
    """Cross entropy of (N, C) logits and (N,) classes, or of sequences: (B, T, V) logits, classes last as
    a language model gives them, with (B, T) targets. The loss is the mean over the counted targets (not
    `ignore_index`), 0 when there is none (not the NaN of a mean over nothing, which would make the sums NaN);
    `weight` says how many there are, so logged and evaluated losses are exact token means.
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100):
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index
        self._counted: tuple = (None, None)  # the latest call's target and its count, for weight()

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.is_floating_point():  # class probabilities: a mean over the samples
            return F.cross_entropy(out, y, label_smoothing=self.label_smoothing)
        target = y
        if out.dim() > 2 and out.shape[:-1] == y.shape:
            out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
        count = (y != self.ignore_index).sum()  # a device tensor: no host sync
        self._counted = (target, count)
        total = F.cross_entropy(out, y, reduction="sum", label_smoothing=self.label_smoothing,
                                ignore_index=self.ignore_index)
        return total / count.clamp(min=1)

    def weight(self, out, y) -> torch.Tensor | int:
        # Classes: the counted ones, tokens of sequences or samples; the loss is a mean over them, also where some
        # (N,) classes are ignore_index. Probabilities: the samples.
        if y.is_floating_point():
            return len(y)
        seen, count = self._counted
        return count if seen is y else (y != self.ignore_index).sum()


def build_loss(cfg: LossConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str | None:
    """The named loss as a function (output, target) -> mean loss; "model" (the model returns its loss); None for `task`."""
    if cfg.name == "cross_entropy":
        return CrossEntropy(cfg.label_smoothing, cfg.ignore_index)
    if cfg.name == "huber":
        return lambda out, y: F.huber_loss(out, y, delta=cfg.huber_delta)
    return {"mse": F.mse_loss, "l1": F.l1_loss, "bce_with_logits": F.binary_cross_entropy_with_logits,
            "model": "model", "task": None}[cfg.name]


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


class TokenMean:
    """Wraps a per-token function of sequence outputs and (B, T) integer targets: the metric is the mean of its
    values over the counted tokens of all ranks (targets that are not `ignore_index`, the padding), where a plain
    per-sample function would be a mean of each sample's mean over all its positions, padding included."""

    width = 2

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ignore_index: int = -100):
        self.fn, self.ignore_index = fn, ignore_index

    def batch_stats(self, output, target):
        counted = target != self.ignore_index
        values = self.fn(output, target).double()
        return torch.stack([torch.where(counted, values, 0.0).sum(), counted.sum().double()])

    def compute(self, stats, count):
        return float(stats[0] / stats[1]) if stats[1] > 0 else float("nan")


token_accuracy = TokenMean(accuracy)  # the share of counted tokens whose class is the most likely one


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


class Sums:
    """Running sums of a run's batches, reduced by one all-reduce: the loss times its weight (times the
    num_items_in_batch a model's own loss was given: its sum), the weight (tokens; 0 when the loss is a mean
    over samples), samples, sequence tokens, each metric's stats, and a slot for the non-finite check that
    rides on the same reduction. The loss and metric sums stay on the device (no host sync until `values()`);
    sample and token counts, known from shapes, are Python ints until they are needed.
    """

    LOSS, WEIGHT, SAMPLES, TOKENS, FIRST_METRIC = range(5)
    PENDING = 64  # losses waiting to be added at most

    def __init__(self, metrics: dict, device: torch.device):
        self.metrics, self.slots, offset = metrics, {}, self.FIRST_METRIC
        for name, m in metrics.items():
            self.slots[name] = slice(offset, offset + m.width)
            offset += m.width
        self.nonfinite = offset
        self.tensor = torch.zeros(offset + 1, dtype=torch.float64, device=device)
        self._loss, self._weight = self.tensor[self.LOSS], self.tensor[self.WEIGHT]  # views, made once
        self._samples = self._tokens = 0
        self._pending: list[tuple] = []  # (loss, weight, num_items) of the micro-batches not yet added

    def add(self, c) -> None:
        """Add one micro-batch's `batch.Computed`. Its loss waits, and up to PENDING of them are added one after
        another (`_add_pending`): on a CPU run a small device op right after the backward costs about 10 us, its
        code pushed out of the caches by the forward and backward, where the same ops in a row cost 1-2 each. The
        backward has freed the graph behind a waiting loss."""
        self._pending.append((c.loss, c.weight, c.num_items))
        if len(self._pending) == self.PENDING:
            self._add_pending()
        self._samples += c.samples
        self._tokens += c.tokens
        if self.metrics:
            with torch.no_grad():
                for name, m in self.metrics.items():
                    self.tensor[self.slots[name]] += m.batch_stats(c.output, c.target).to(self.tensor)

    def _add_pending(self) -> None:
        with torch.no_grad():  # in the order they came, so the sums are bitwise those of adding each at once
            for loss, weight, num_items in self._pending:
                if isinstance(weight, int):  # a mean over samples
                    self._loss.add_(loss, alpha=weight)
                else:  # a mean over `weight` tokens, or a model's sum over them divided by its num_items_in_batch
                    self._loss.add_(loss.double() * (weight if num_items is None else num_items))
                    self._weight.add_(weight)
        self._pending = []

    def _flush(self) -> None:
        if self._pending:
            self._add_pending()
        if self._samples or self._tokens:
            self.tensor[self.SAMPLES] += self._samples
            self.tensor[self.TOKENS] += self._tokens
            self._samples = self._tokens = 0

    def reduce(self, dist, nonfinite: torch.Tensor | None = None, ride: torch.Tensor | None = None):
        """Sum over all ranks, in place; `nonfinite` (a count of non-finite weights) rides along, and so does
        `ride` (any vector), whose sum is returned. Call on all ranks."""
        self._flush()
        if nonfinite is not None:
            self.tensor[self.nonfinite] = nonfinite
        if ride is None:
            dist.all_reduce_sum(self.tensor)
            return None
        both = dist.all_reduce_sum(torch.cat([self.tensor, ride.to(self.tensor)]))
        self.tensor.copy_(both[:len(self.tensor)])
        return both[len(self.tensor):].cpu()

    def all_finite(self) -> torch.Tensor:
        return self.tensor[self.nonfinite] == 0

    def values(self) -> dict:
        """{'loss': ..., <metric>: ...}: means over all samples (or tokens) added, of all ranks once reduced."""
        self._flush()
        t = self.tensor.cpu()
        count = int(t[self.SAMPLES])
        weight = float(t[self.WEIGHT]) or count
        values = {"loss": float(t[self.LOSS] / max(weight, 1))}
        for name, m in self.metrics.items():
            values[name] = m.compute(t[self.slots[name]], count)
        return values

    def tokens(self) -> int:
        self._flush()
        return int(self.tensor[self.TOKENS])

    def zero(self) -> None:
        self.tensor.zero_()
        self._samples = self._tokens = 0
        self._pending = []

    def state_dict(self) -> torch.Tensor:
        self._flush()
        return self.tensor[:-1].cpu()  # the non-finite slot is filled just before a reduction, cleared after

    def load_other_world_size(self, states: list[torch.Tensor], rank: int) -> None:
        """Resumed on another world size: rank 0 holds all unlogged sums, so the next record still adds up."""
        self.load_state_dict(sum(states) if rank == 0 else torch.zeros_like(states[0]))

    def load_state_dict(self, state: torch.Tensor) -> None:
        if len(state) == len(self.tensor) - 3:  # format 1's [loss sum, samples, metric stats...]
            state = torch.cat([state[:1], state.new_zeros(1), state[1:2], state.new_zeros(1), state[2:]])
        self.tensor[:-1].copy_(state)
        self.tensor[self.TOKENS] = 0  # they count for tokens/s alone, whose clock starts with this attempt
