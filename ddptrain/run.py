"""Starting a run on this rank, and ending it: `train` from a config, `run` on every rank.

`run` does everything that needs no process group (config checks, the task, the pre-flight check), then makes
the process group and takes the run directory's lock, trains (`Training`, trainer.py) and, however that ends,
says which collective failed and tears down in order (a write in flight, the lock, the process group).
"""
from __future__ import annotations

import gc
import os
import traceback
from pathlib import Path
from typing import Callable

from . import checkpoint as ckpt
from . import config as config_mod
from . import configfile
from . import observe
from .config import Config
from .data import check_batch_size, micro_batch_size
from .dist import Dist, DistEnv, detect, explain_failure, in_callers_group
from .lock import RunLock
from .preflight import (check_optimizer, check_run_length, check_strategy, check_sync_batchnorm, check_val_mode,
                        prepare, take_run_dir)
from .runlog import prefix_warnings
from .state import rank_seed, seed_everything
from .trainer import Training


def train(config: Config | dict | str | os.PathLike, task: Callable | None = None,
          overrides: list[str] = ()) -> dict:
    """Train from a Config, a plain dict or a config file path; return the summary.

    `task` may be the task function itself (handy in notebooks); otherwise `config.task` names it.
    Works in one process, or on every rank when the script is started by torchrun or srun, also in a process
    group that the script made itself (which it keeps).
    """
    if isinstance(config, Config):
        cfg = configfile.from_dict(configfile.apply_overrides(config_mod.to_dict(config), list(overrides)))
    elif isinstance(config, dict):
        cfg = configfile.load(base=config, overrides=overrides)
    else:
        cfg = configfile.load(config, overrides)
    return run(cfg, detect(os.environ), task)


def run(cfg: Config, env: DistEnv, task_fn: Callable | None = None, hooks: dict | None = None) -> dict:
    """Train on this rank: the pre-flight work, then the loop. Call on all ranks.

    `hooks["before_micro_step"](step, micro_step, batch) -> batch` sees every micro-batch first (tests, benchmarks).
    """
    env = in_callers_group(env)
    if not env.is_main:
        prefix_warnings(env.rank)
    micro_batch_size(cfg.data, env.world_size, cfg.train.grad_accum_steps)  # fail before any process group
    check_sync_batchnorm(cfg, env.world_size)
    check_strategy(cfg, env.world_size)
    device, backend, task, forward, metrics = prepare(cfg, env, task_fn)
    check_batch_size(task.train, cfg.data)
    check_run_length(cfg, task)
    check_val_mode(cfg, task)
    check_optimizer(cfg, task)
    seed_everything(rank_seed(cfg.seed, env.rank))
    training, dist, lock = None, None, RunLock(cfg.run_dir) if env.is_main else None
    recorded = observe.flight_recorder(cfg.run_dir, cfg.dist.flight_recorder and backend == "nccl")
    try:
        dist = Dist(env, device, backend, cfg.dist.init_timeout_s, cfg.val.rank0_timeout_s)
        take_run_dir(cfg, dist, lock)
        if recorded is not None:  # the run directory is this run's now: the dumps have a place to go
            Path(recorded).parent.mkdir(parents=True, exist_ok=True)
        training = Training(cfg, dist, task, forward, metrics)
        return training.fit((hooks or {}).get("before_micro_step"))
    except RuntimeError as e:
        # The traceback keeps the frames, and with them the DDP model, alive; a DDP object freed after
        # destroy_process_group can deadlock in gloo (pytorch#56297), so free it first.
        traceback.clear_frames(e.__traceback__)
        explained = explain_failure(e, env, *_where(training, cfg), recorded)
        if explained is None:
            raise
        raise explained from e
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        if training is not None:
            training.data.close()
            try:  # a write in flight ends before the process group does (or fails: it is never marked whole)
                training.strategy.close()
            except ckpt.CheckpointError:
                pass
        training = None
        if lock is not None:
            lock.release()
        gc.collect()
        if dist is not None:  # the process group, if made here; a caller's stays theirs
            dist.close()


def _where(training: Training | None, cfg: Config) -> tuple[str, int, str]:
    """Where a failed run was, for explain_failure: its phase, its step and the timeout in force."""
    if training is None:
        return "start-up", 0, f"dist.init_timeout_s={cfg.dist.init_timeout_s:g}"
    return training.phase, training.progress.step, f"{training.dist.timeout_key}={training.dist.timeout_s:g}"
