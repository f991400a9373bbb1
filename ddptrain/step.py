"""One optimizer step: k micro-batches, then unscale, clip, step, schedule.

All but the last micro-batch run under DDP's `no_sync`, so gradients are all-reduced once per step.
Each micro-batch's loss is a mean over its samples; dividing it by k makes the accumulated gradient
the mean over the whole step's batch, whatever the world size and k. A loss that is a mean over counted
tokens (the built-in cross entropy on sequences, with padding) is weighted by its micro-batch's share of
the step's tokens on all ranks instead, so that the gradient is the mean over all of them, not a mean of
each micro-batch's mean: the count, taken from the targets still on the CPU, is summed over ranks on the gloo
control group in the background while the first forward runs (no device sync). So is a model's own loss
(`loss="model"`) on sequence labels, counting the labels that are not -100; a model that takes
`num_items_in_batch` (Hugging Face's contract) is given the step's count over the world size instead, and
its loss, the sum over its tokens divided by that, is not weighted again; for it the sum is awaited before
the first forward. The L1 penalty, a function of the weights alone, is divided by k and never weighted by tokens.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .batch import Computed, Forward
from .config import TrainConfig
from .optim import changes_lr, l1_penalty, optimizer_step
from .precision import Precision


class TrainStep:
    def __init__(self, model: Callable, module: nn.Module, forward: Forward, optimizer, scheduler,
                 precision: Precision, tc: TrainConfig, l1: float, no_sync: Callable | None, timer,
                 layer_norms: Callable[[], dict] | None = None, dist=None):
        """`model` is what runs the forward pass (DDP-wrapped, maybe compiled); `module` is the bare network;
        `timer` times the forwards (observe.RankTime); `layer_norms()`, if given, is measured at log steps."""
        self.model, self.module, self.forward, self.timer = model, module, forward, timer
        self.layer_norms, self.norms = layer_norms, None  # norms: the latest log step's, by layer
        self.optimizer, self.scheduler, self.precision, self.tc, self.l1 = optimizer, scheduler, precision, tc, l1
        self.no_sync, self.dist = no_sync, dist
        self.count: Callable | None = None  # the step's counted tokens on all ranks, being summed (begin)
        self.scale: float | None = None  # world size / that count, once it is known
        self.num_items: float | None = None  # that count / world size: a model's num_items_in_batch
        self.token_mean: bool | None = None  # the loss is a mean over counted tokens: known from the first step
        self.params = list(module.parameters())  # made once: walking the module tree costs as much as a small step
        self.steps_schedule = changes_lr(scheduler)

    def begin(self, batches: list) -> None:
        """Before a step's micro-batches: with a token-mean loss, start the count of the step's tokens on all
        ranks (one rank, one micro-batch: its own mean is the step's). Call on all ranks."""
        self.count = self.scale = self.num_items = None
        if self.token_mean is False or self.dist is None or (len(batches) == 1 and self.dist.env.world_size == 1):
            return
        counts = [self.forward.counted(b) for b in batches]
        self.token_mean = counts[0] is not None  # the same on every rank and step: one kind of target per task
        if self.token_mean:
            self.count = self.dist.sum_later([sum(counts)])

    def _counted(self) -> None:
        """Wait for the step's count; no step is empty of tokens on all ranks (0 / 0 would make the loss NaN)."""
        if self.scale is None:
            total, world = max(self.count()[0], 1), self.dist.env.world_size
            self.scale, self.num_items = world / total, total / world

    def _share(self, weight: torch.Tensor) -> torch.Tensor:
        """A micro-batch's part of the step: its counted tokens over the mean count of a rank (DDP and FSDP
        average the ranks' gradients)."""
        self._counted()
        return weight * self.scale

    def micro_step(self, batch, last: bool) -> Computed:
        """Forward and backward of one micro-batch; the gradients are all-reduced only when `last`."""
        items = None
        if self.count is not None and self.forward.num_items:
            self._counted()  # the model divides by the step's count: it must be known before its forward
            items = self.num_items
        if last or self.no_sync is None:
            return self._forward_backward(batch, items)
        with self.no_sync():
            return self._forward_backward(batch, items)

    def _forward_backward(self, batch, items: float | None) -> Computed:
        k = self.tc.grad_accum_steps
        with self.precision.autocast():
            self.timer.begin()
            c = self.forward(self.model, batch, num_items=items)
            self.timer.end()
            penalty = l1_penalty(self.module, self.l1) / k if self.l1 else None  # of the weights: never weighted
        if items is not None:  # (its tokens' losses) / (the step's tokens / world size): weighted already
            loss = c.loss
        else:
            loss = c.loss * self._share(c.weight) if self.count is not None else c.loss / k if k > 1 else c.loss
        self.precision.backward(loss if penalty is None else loss + penalty)
        return c

    def optimizer_step(self, measure: bool) -> tuple[torch.Tensor | None, bool]:
        """Unscale, clip, step, schedule; return (pre-clip grad norm or None, whether the optimizer stepped)."""
        take = self._take_layer_norms if measure and self.layer_norms is not None else None
        norm, stepped = optimizer_step(self.params, self.optimizer, self.precision, self.tc, measure, take)
        if self.steps_schedule:
            self.scheduler.step()
        return norm, stepped

    def _take_layer_norms(self) -> None:
        self.norms = self.layer_norms()
