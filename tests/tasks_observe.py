"""Test tasks for what a run shows about itself: a rank with a slow forward, and a model that runs out of
(CUDA) memory in training."""
from __future__ import annotations

import os
import time

import torch

from tasks_any_batch import OneInput, shapes


class SlowOnRank1(OneInput):
    """Its forward takes 20 ms longer on rank 1: a slow GPU or host there."""

    def forward(self, x):
        if self.training and os.environ.get("RANK") == "1":
            time.sleep(0.02)
        return super().forward(x)


class OutOfMemory(OneInput):
    def forward(self, x):
        if self.training:  # the pre-flight check (eval mode) passes; training does not
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().forward(x)


def _with(model_class, cfg):
    task = shapes(cfg)
    torch.manual_seed(cfg.seed)
    task.model = model_class()
    return task


def slow_rank1(cfg):
    return _with(SlowOnRank1, cfg)


def out_of_memory(cfg):
    return _with(OutOfMemory, cfg)
