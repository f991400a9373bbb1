"""Validation and test: the same numbers for any world size.

`sharded`: each rank runs its disjoint, unpadded shard and one all-reduce adds the sums and counts.
`rank0`: rank 0 runs the whole set alone while the others wait for its result on a gloo group of its
own, whose timeout is `val.rank0_timeout_s`; every other wait of the run ends after `dist.timeout_s`. The unwrapped module is used, in
eval mode, so DDP issues no collective while only some ranks run it.
Under FSDP every forward gathers weights from all ranks, so every rank must run as many batches
(`lockstep`): a rank whose shard has run out repeats its last batch, uncounted, until all are done; a rank
whose shard is empty runs another rank's first batch, uncounted, as often.
Losses are means over samples, or over counted tokens for sequences (the built-in cross entropy, or a
model's own loss on labels that are not -100), the same for any world size and batch size.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from .batch import Forward, map_tensors, to_device
from .config import DataConfig
from .data import eval_loader, pinned
from .dist import Dist
from .losses import Sums
from .precision import Precision
from .task import user_error


class Evaluator:
    def __init__(self, dist: Dist, forward: Forward, metrics: dict, precision: Precision, mode: str,
                 data: DataConfig, collate: Callable | None = None, lockstep: bool = False):
        self.dist, self.forward, self.metrics, self.precision = dist, forward, metrics, precision
        self.mode, self.data, self.collate, self.lockstep = mode, data, collate, lockstep
        self.pin = pinned(data, dist.device, forward.cpu_batches)

    def __call__(self, module: nn.Module, dataset: Dataset) -> dict:
        """Metrics of `dataset` on every rank: {'loss': ..., <metric>: ...}. Call on all ranks."""
        env = self.dist.env
        rank, world = (env.rank, env.world_size) if self.mode == "sharded" else (0, 1)
        if self.mode == "sharded":
            # Each rank's running statistics (batch norm) follow its own batches since the last training forward,
            # which gives them rank 0's (DDP, and FSDP's pre-hook): the shards are evaluated with rank 0's, those
            # of the checkpoint and of rank 0's evaluation in rank0 mode.
            self.dist.broadcast_buffers(module)
        was_training = module.training
        module.eval()
        values = None
        if self.mode == "sharded" or env.is_main:
            try:
                sums = self._sums(module, eval_loader(dataset, self.data, rank, world, self.pin, self.collate))
            except Exception as e:
                raise user_error(e, f"evaluation (its data, the model or a metric) on rank {env.rank}") from e
            if self.mode == "sharded":
                sums.reduce(self.dist)
            values = sums.values()
        module.train(was_training)
        # Rank 0's values go to everyone, so that every rank takes the same decisions from them.
        return self.dist.broadcast_object(values, after_rank0_alone=self.mode == "rank0")

    @torch.no_grad()
    def _sums(self, module: nn.Module, loader) -> Sums:
        sums = Sums(self.metrics, self.dist.device)
        for batch, counted in (self._in_lockstep(loader) if self.lockstep else ((b, True) for b in loader)):
            # A model's own loss that takes num_items_in_batch is given the batch's count of its labels: its loss
            # is then the batch's sum over them / their count, exactly, whatever the model counts itself.
            items = self.forward.counted(batch) if self.forward.num_items else None
            with self.precision.autocast():
                # The loss is taken in float64, so its sum over batches and shards does not depend (to
                # ~1e-15) on how the samples were cut into batches.
                computed = self.forward(module, to_device(batch, self.dist.device), precise=True,
                                        num_items=None if items is None else max(items, 1))
            if counted:
                sums.add(computed)
        return sums

    def _in_lockstep(self, loader):
        """(batch, counted) for as long as any rank has a batch. A rank whose part has run out repeats its last
        batch, uncounted; one whose part is empty (a set with fewer samples, or a stream with fewer parts, than
        the ranks) runs the first batch of the first rank that has one, uncounted. Call on all ranks."""
        world = self.dist.env.world_size
        it = iter(loader)
        batch = next(it, None)
        first, all_have = self.dist.min_later([self.dist.env.rank if batch is not None else world,
                                               int(batch is not None)])()
        if first == world:  # no rank has a sample
            return
        spare = None  # what this rank runs, uncounted, when it has no batch: its last one, or rank `first`'s
        if not all_have:  # rank `first`'s batch, sent from the CPU: a device tensor would unpickle onto its device
            spare = self.dist.broadcast_object(map_tensors(torch.Tensor.cpu, batch) if batch is not None else None,
                                               src=first)
        while True:
            if batch is None:
                yield spare, False
            else:
                spare = batch
                yield batch, True
            batch = next(it, None)
            if not self.dist.any(batch is not None):
                return
