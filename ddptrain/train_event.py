"""A log step's train event: the train sums reduced (the loop's own collective, every `train.log_every`
steps), with the rates, tokens/s, MFU, the slowest and fastest rank's time per step, gradient norms and
CUDA memory. A function of the run's `Training` (trainer.py).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from . import nonfinite, observe
from .optim import nonfinite_count
from .results import mfu

if TYPE_CHECKING:
    from .trainer import Training


def log_train(t: Training, epoch: int) -> None:
    """Reduce the train sums (the loop's own collective, every log_every steps) and record them. Call on all ranks."""
    p, sums, env, rates = t.progress, t.sums, t.dist.env, t.rates
    steps = p.step - rates.log_step
    own = None  # each rank's own time per step (observe.RankTime), in its slot: it rides on the reduction
    if env.world_size > 1:
        own = torch.zeros(env.world_size, dtype=torch.float64)
        own[env.rank] = (rates.data_wait_s + t.rank_time.take()) / max(steps, 1)
    own = sums.reduce(t.dist, nonfinite=nonfinite_count(t.step.params), ride=own)  # finiteness agreed too
    values = sums.values()  # on the host: the device has done the interval's work (rates are not queueing rates)
    now = time.perf_counter()
    elapsed, tokens = now - rates.log_time - rates.paused_s, sums.tokens()
    event = {"split": "train", "step": p.step, "epoch": epoch, **values,
             "lr": t.optimizer.param_groups[0]["lr"], "grad_norm": float(t.norm),
             "skipped_steps": p.skipped_total,
             "samples_per_s": steps * t.cfg.data.batch_size / elapsed,
             "data_wait_share": rates.data_wait_s / elapsed, "time": t.clock()}
    if tokens:
        event["tokens_per_s"] = tokens / elapsed
        rates.tokens += tokens
    if t.peak_flops and t.flops_per_sample:
        event["mfu"] = mfu(event["samples_per_s"], t.flops_per_sample, t.peak_flops, env.world_size)
    if own is not None and env.is_main:
        event.update(t.stragglers.fields(own.tolist()))
    if t.step.norms is not None:
        event["grad_norms"] = t.step.norms
    event.update(observe.memory_fields(t.dist.device))
    t.log.record(event)
    t.log.progress(p.step, t.total_steps)
    nonfinite.check_finite(t, sums.all_finite())
    sums.zero()
    rates.next_interval(now, p.step)
