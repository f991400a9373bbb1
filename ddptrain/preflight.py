"""Before the loop: the device, seeds, the task and its pre-flight check (no process group yet), the run
directory's lock. (How the model is spread over the ranks is strategy.py's.)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import torch

from . import checkpoint as ckpt
from . import config as config_mod
from . import task as task_mod
from .config import Config
from .dist import Dist, DistEnv, pick_device
from .lock import RunLock
from .models import on_meta
from .state import seed_everything


def prepare(cfg: Config, env: DistEnv, task_fn: Callable | None = None):
    """What training and evaluation do before a process group: device, seeds, the task and its pre-flight
    check. Returns (device, backend, task, forward, metrics)."""
    device, backend = pick_device(env, cfg.dist.device, cfg.dist.backend)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if cfg.train.compile:
        from torch import _dynamo
        backends = _dynamo.list_backends(exclude_tags=())
        if cfg.train.compile_backend not in backends:
            raise config_mod.ConfigError(f"config key 'train.compile_backend': expected one of {', '.join(backends)}, "
                                         f"got {cfg.train.compile_backend!r}")
    seed_everything(cfg.seed)  # the same initial weights on every rank and for every world size
    if task_fn is not None:  # messages name the function that was passed, not the config's `task`
        cfg = dataclasses.replace(cfg, task=f"{task_fn.__module__}:{task_fn.__qualname__}")
    task = task_mod.build(cfg, task_fn or task_mod.resolve(cfg.task))
    if not on_meta(task.model):  # the check runs where training will: fast for big models, and a dataset may make CUDA tensors
        task.model.to(device)
    forward, metrics = task_mod.prepare(cfg, task)
    return device, backend, task, forward, metrics


def check_sync_batchnorm(cfg: Config, world_size: int) -> None:
    if cfg.dist.sync_batchnorm and world_size > 1 and (cfg.dist.device == "cpu" or not torch.cuda.is_available()):
        raise config_mod.ConfigError("config key 'dist.sync_batchnorm': torch's SyncBatchNorm runs on GPUs only; "
                                     "set it to false on CPU")


def check_strategy(cfg: Config, world_size: int) -> None:
    if cfg.dist.strategy != "fsdp":
        return
    if cfg.dist.comm_hook != "none":
        raise config_mod.ConfigError(f"config key 'dist.comm_hook': {cfg.dist.comm_hook} is a DDP communication hook; "
                                     f"fsdp reduces in train.precision's reduce dtype (fp32); set it to none")
    default = config_mod.DistConfig()
    for key in ("find_unused_parameters", "static_graph", "gradient_as_bucket_view", "bucket_cap_mb"):
        value, usual = getattr(cfg.dist, key), getattr(default, key)
        if value != usual:
            raise config_mod.ConfigError(f"config key 'dist.{key}': {json.dumps(value)} is a DDP setting, which fsdp "
                                         f"does not use; leave it at {json.dumps(usual)} (its default)")
    if world_size < 2:
        raise config_mod.ConfigError("config key 'dist.strategy': fsdp shards the model over 2 or more ranks; this run "
                                     "has 1 (use ddp, or launch more ranks)")
    if cfg.val.mode == "rank0":
        raise config_mod.ConfigError("config key 'val.mode': rank0 needs the whole model on rank 0, which fsdp does not "
                                     "keep; use sharded (the same numbers, for any world size)")


def check_optimizer(cfg: Config, task: task_mod.Task) -> None:
    """Build an optimizer of torch.optim's that the config names once, on the model's parameters: wrong optim.args
    then fail before the process group and the run directory's lock, and leave nothing behind. The task's own, or
    another library's (a distributed optimizer may need the process group), is first built by training."""
    from .importing import import_object
    from .optim import build_optimizer
    if task.optimizer is None and (cfg.optim.name in config_mod.OPTIMIZERS or getattr(
            import_object(cfg.optim.name, "optim.name"), "__module__", "").startswith("torch.optim")):
        build_optimizer(task.model, cfg.optim)


def check_val_mode(cfg: Config, task: task_mod.Task) -> None:
    """val.mode rank0 reads the whole set on rank 0; a stream that splits itself would give rank 0 its own part."""
    from .stream import is_stream
    if cfg.val.mode == "rank0" and cfg.data.stream_sharding == "dataset" and \
            any(is_stream(s) for s in (task.val, task.test) if s is not None):
        raise config_mod.ConfigError("config key 'val.mode': rank0 reads the whole set on rank 0 alone, but a stream "
                                     "that splits itself (data.stream_sharding: dataset) gives rank 0 its own part; "
                                     "use val.mode: sharded (the same numbers on any world size)")


def check_run_length(cfg: Config, task: task_mod.Task) -> None:
    """A schedule laid out over the whole run needs the run's length: a stream without one needs max_steps."""
    from .data import stream_length
    from .optim import unknown_length
    from .stream import is_stream
    if (is_stream(task.train) and cfg.train.max_steps is None and task.scheduler is None
            and cfg.sched.name in config_mod.SPANS_RUN and stream_length(task.train) is None):
        raise unknown_length(cfg.sched.name)


def take_run_dir(cfg: Config, dist: Dist, lock: RunLock | None) -> None:
    """Rank 0 locks the run directory and removes what a killed writer left; every rank learns whether it
    may go on. Call on all ranks."""
    problem = None
    if lock is not None:
        try:
            holder = lock.acquire()
        except OSError as e:
            holder, problem = None, f"config key 'runs_dir': cannot create the run directory '{cfg.run_dir}' " \
                                    f"({e.strerror})"
        if holder is not None:
            problem = f"run directory '{cfg.run_dir}' is in use by another run ({holder}); wait for it to end, " \
                      f"or give this run another `name`"
        elif problem is None:
            ckpt.remove_temporaries(cfg.run_dir)
    problem = dist.broadcast_object(problem)
    if problem:
        raise config_mod.ConfigError(problem)
