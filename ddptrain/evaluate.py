"""Validation and test: the same numbers for any world size.

`sharded`: each rank runs its disjoint, unpadded shard and one all-reduce adds the sums and counts.
`rank0`: rank 0 runs the whole set alone while the others wait on the gloo control group, whose
timeout is `val.rank0_timeout_s`, not the short training timeout. The unwrapped module is used, in
eval mode, so DDP issues no collective while only some ranks run it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from .config import Config
from .data import eval_loader
from .dist import Dist
from .losses import metric_values
from .precision import Precision


@torch.no_grad()
def _sums(module: nn.Module, loader, loss_fn, metrics: dict, precision: Precision, device) -> torch.Tensor:
    """[loss sum, sample count, metric stats...] over one loader, in float64."""
    total = None
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with precision.autocast():
            out = module(x)
        # The loss is a mean over the batch; taking it in float64 makes its sum over batches and
        # shards independent (to ~1e-15) of how the samples were cut into batches.
        loss = loss_fn(out.double(), y.double() if y.is_floating_point() else y)
        n = len(y)
        parts = [(loss.double() * n).reshape(1), torch.tensor([float(n)], dtype=torch.float64, device=device)]
        parts += [m.batch_stats(out, y).to(device) for m in metrics.values()]
        row = torch.cat([p.double() for p in parts])
        total = row if total is None else total + row
    return total


def evaluate(cfg: Config, dist: Dist, module: nn.Module, dataset: Dataset, loss_fn, metrics: dict,
             precision: Precision) -> dict:
    """Metrics of `dataset` on every rank: {'loss': ..., <metric>: ...}. Call on all ranks."""
    env = dist.env
    rank, world = (env.rank, env.world_size) if cfg.val.mode == "sharded" else (0, 1)
    was_training = module.training
    module.eval()
    values = None
    if cfg.val.mode == "sharded" or env.is_main:
        loader = eval_loader(dataset, cfg.data, rank, world, dist.device)
        stats = _sums(module, loader, loss_fn, metrics, precision, dist.device)
        if stats is None:  # this rank's shard is empty (more ranks than samples)
            stats = torch.zeros(2 + sum(m.width for m in metrics.values()), dtype=torch.float64, device=dist.device)
        if cfg.val.mode == "sharded":
            dist.all_reduce_sum(stats)
        values = metric_values(stats, metrics)
    module.train(was_training)
    # Rank 0's values go to everyone, so that every rank takes the same decisions from them.
    return dist.broadcast_object(values)
