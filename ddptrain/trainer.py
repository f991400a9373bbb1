"""The training run: set-up, one readable loop, and the end (best weights, test, summary).

Order inside an optimizer step: k micro-batches (all but the last under `no_sync`, so gradients are
all-reduced once) -> unscale -> global grad norm -> clip -> finite check -> optimizer step -> schedule.
The loop has no per-step collective of its own: train loss sums stay on the device and are reduced
only every `train.log_every` steps. Validation results and stop decisions come from rank 0.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
import random
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import checkpoint as ckpt
from . import config as config_mod
from . import task as task_mod
from .config import Config
from .data import train_loader, micro_batch_size
from .dist import Dist, DistEnv, detect, pick_device
from .early_stop import EarlyStopping
from .evaluate import evaluate
from .losses import ELEMENTWISE, as_metric, build_loss, metric_values
from .models import convert_sync_batchnorm
from .optim import build_optimizer, build_scheduler, l1_penalty
from .precision import Precision
from .runlog import Clock, ConsoleLogger, Loggers, NullLogger, RunDirLogger, prefix_warnings

# Under fp16 a few overflowing steps are normal (the scaler is finding its scale); this many in a
# row means the run has diverged.
FP16_MAX_CONSECUTIVE_SKIPS = 20


class NonFiniteError(RuntimeError):
    """Training hit NaN/Inf gradients with `train.nonfinite: stop`; raised on every rank at the same step."""


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank died, stalled or cannot be reached."""


def _explain(error: RuntimeError, env: DistEnv, where: dict, cfg: Config) -> CollectiveError | None:
    """A collective's failure as one sentence that names the likely cause, or None if it is something else."""
    text = str(error)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if isinstance(error, torch.distributed.DistError) or any(
            s in text for s in ("Timed out", "timed out", "Connection closed by peer", "Connection reset")):
        return CollectiveError(
            f"[rank {env.rank}] a collective failed during {where['phase']} (step {where['step']}): another rank "
            f"died, stalled or is unreachable; the collective timeout is dist.timeout_s={cfg.dist.timeout_s:g} s "
            f"({first})")
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def rank_seed(seed: int, rank: int) -> int:
    """A distinct, reproducible seed per rank (for dropout and augmentation)."""
    return (seed * 1_000_003 + rank + 1) % 2**63


def train(config: Config | dict | str | os.PathLike, task: Callable | None = None,
          overrides: list[str] = ()) -> dict:
    """Train from a Config, a plain dict or a config file path; return the summary.

    `task` may be the task function itself (handy in notebooks); otherwise `config.task` names it.
    Works in one process, or on every rank when the script is started by torchrun or srun.
    """
    if isinstance(config, Config):
        cfg = config_mod.from_dict(config_mod.apply_overrides(config_mod.to_dict(config), list(overrides)))
    elif isinstance(config, dict):
        cfg = config_mod.load(base=config, overrides=overrides)
    else:
        cfg = config_mod.load(config, overrides)
    return run(cfg, detect(os.environ), task)


def run(cfg: Config, env: DistEnv, task_fn: Callable | None = None, hooks: dict | None = None) -> dict:
    """Everything up to the process group (validation, task, shape check), then the loop."""
    device, backend = pick_device(env, cfg.dist.device, cfg.dist.backend)
    micro_batch_size(cfg.data, env.world_size, cfg.train.grad_accum_steps)  # fail before any process group
    if cfg.dist.sync_batchnorm and device.type == "cpu" and env.world_size > 1:
        raise config_mod.ConfigError("config key 'dist.sync_batchnorm': torch's SyncBatchNorm runs on GPUs only; "
                                     "set it to false on CPU")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    seed_everything(cfg.seed)  # the same initial weights on every rank and for every world size
    task = task_mod.build(cfg, task_fn or task_mod.resolve(cfg.task))
    loss_fn = build_loss(cfg.loss) or task.loss
    if loss_fn is None:
        raise config_mod.ConfigError("config key 'loss.name': the task returns no loss; name one "
                                     "(cross_entropy, mse, l1, huber, bce_with_logits)")
    metrics = {name: as_metric(m) for name, m in task.metrics.items()}
    task_mod.check(cfg, task, loss_fn, metrics, cfg.loss.name in ELEMENTWISE)
    seed_everything(rank_seed(cfg.seed, env.rank))

    where = {"phase": "start-up", "step": 0}  # updated by _fit, for error messages
    if not env.is_main:
        prefix_warnings(env.rank)
    try:
        dist = Dist(env, device, backend, cfg.dist.init_timeout_s, cfg.val.rank0_timeout_s)
        return _fit(cfg, dist, task, loss_fn, metrics, hooks or {}, where)
    except RuntimeError as e:
        # The traceback keeps _fit's frame, and with it the DDP model, alive; a DDP object freed
        # after destroy_process_group can deadlock in gloo (pytorch#56297), so free it first.
        traceback.clear_frames(e.__traceback__)
        explained = _explain(e, env, where, cfg)
        if explained is None:
            raise
        raise explained from e
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _loggers(cfg: Config, dist: Dist, total_steps: int) -> Loggers | NullLogger:
    if not dist.env.is_main:
        return NullLogger()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.yaml").write_text(config_mod.dump_yaml(cfg))
    return Loggers(RunDirLogger(cfg.run_dir), ConsoleLogger(total_steps))


def _wrap(model: nn.Module, cfg: Config, dist: Dist) -> nn.Module:
    if not dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    d = cfg.dist
    return DDP(model, device_ids=[dist.device] if dist.device.type == "cuda" else None,
               find_unused_parameters=d.find_unused_parameters, static_graph=d.static_graph,
               gradient_as_bucket_view=d.gradient_as_bucket_view, bucket_cap_mb=d.bucket_cap_mb)


def optimizer_step(module: nn.Module, optimizer, precision: Precision, cfg: Config) -> tuple[torch.Tensor, bool]:
    """Unscale, measure, clip and step. Return (pre-clip global grad norm, whether the step was taken)."""
    precision.unscale(optimizer)
    grads = [p for p in module.parameters() if p.grad is not None]
    if cfg.train.clip_grad_norm is not None:
        norm = nn.utils.clip_grad_norm_(grads, cfg.train.clip_grad_norm)
    else:
        norm = nn.utils.get_total_norm([p.grad for p in grads])
    if cfg.train.clip_grad_value is not None:
        nn.utils.clip_grad_value_(grads, cfg.train.clip_grad_value)
    # One host sync per step. The gradients were all-reduced, so the norm (and the decision) is the
    # same on every rank without another collective.
    if precision.scaler is None and not bool(torch.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        return norm, False
    stepped = precision.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return norm, stepped


def _fit(cfg: Config, dist: Dist, task: task_mod.Task, loss_fn, metrics: dict, hooks: dict, where: dict) -> dict:
    env, device, tc = dist.env, dist.device, cfg.train
    clock = Clock()
    module = task.model.to(device)
    if cfg.dist.sync_batchnorm:
        module = convert_sync_batchnorm(module)
    model = _wrap(module, cfg, dist)
    step_model = torch.compile(model, backend=tc.compile_backend) if tc.compile else model
    optimizer = build_optimizer(module, cfg.optim)
    loader, sampler = train_loader(task.train, cfg.data, env, tc.grad_accum_steps, cfg.seed, device)
    steps_per_epoch = len(loader) // tc.grad_accum_steps
    total_steps = cfg.train.epochs * steps_per_epoch
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    scheduler = build_scheduler(optimizer, cfg.sched, total_steps, cfg.optim.lr)
    precision = Precision(tc.precision, device)
    stopper = EarlyStopping(cfg.early_stop.mode, cfg.early_stop.patience, cfg.early_stop.min_delta)
    log = _loggers(cfg, dist, total_steps)
    ckpt_dir = cfg.run_dir / "checkpoints"

    step, epoch, skipped_in_a_row, skipped_total = 0, 0, 0, 0
    n_metrics = 2 + sum(m.width for m in metrics.values())
    running = torch.zeros(n_metrics, dtype=torch.float64, device=device)
    train_time, first_step_time, last_log = 0.0, None, (time.perf_counter(), 0)
    stopped_early, val_values = False, None

    def checkpoint_state() -> dict:
        return {"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "precision": precision.state_dict(),
                "early_stop": stopper.state_dict(), "epoch": epoch, "step": step,
                "config": config_mod.to_dict(cfg), "world_size": env.world_size}

    dist.set_timeout(cfg.dist.timeout_s)
    where["phase"] = "training"
    with warnings.catch_warnings():
        # A step skipped by the gradient scaler makes torch warn that the schedule stepped first.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        for epoch in range(cfg.train.epochs):
            if step >= total_steps:
                break
            sampler.set_epoch(epoch)
            model.train()
            t0 = time.perf_counter()
            micro_batches = itertools.islice(loader, steps_per_epoch * tc.grad_accum_steps)
            for micro_step, (x, y) in enumerate(micro_batches):
                if "before_micro_step" in hooks:
                    x, y = hooks["before_micro_step"](step, micro_step, x, y)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = (micro_step + 1) % tc.grad_accum_steps == 0
                with contextlib.nullcontext() if sync or not dist.active else model.no_sync():
                    with precision.autocast():
                        out = step_model(x)
                        loss = loss_fn(out, y)
                        objective = loss + l1_penalty(module, cfg.optim.l1)
                    # Each micro-batch loss is a mean over its samples; dividing by their number makes
                    # the accumulated gradient the mean over the whole step's batch.
                    precision.backward(objective / tc.grad_accum_steps)
                with torch.no_grad():
                    n = len(y)
                    running[0] += loss.detach().double() * n
                    running[1] += n
                    offset = 2
                    for m in metrics.values():
                        running[offset:offset + m.width] += m.batch_stats(out.detach(), y).to(running)
                        offset += m.width
                if not sync:
                    continue

                norm, stepped = optimizer_step(module, optimizer, precision, cfg)
                if cfg.sched.name != "plateau":
                    scheduler.step()
                step += 1
                where["step"] = step
                first_step_time = first_step_time or clock()
                skipped_in_a_row = 0 if stepped else skipped_in_a_row + 1
                skipped_total += not stepped
                limit = FP16_MAX_CONSECUTIVE_SKIPS if precision.scaler is not None else 0
                if skipped_in_a_row > limit and tc.nonfinite == "stop":
                    raise NonFiniteError(f"non-finite gradient norm ({float(norm)}) at step {step}, epoch {epoch}; "
                                         f"set train.nonfinite=skip to skip such steps, or lower optim.lr")
                if step % tc.log_every == 0 or step == total_steps:
                    dist.all_reduce_sum(running)  # the only collective of the loop, every log_every steps
                    values = metric_values(running, metrics)
                    now = time.perf_counter()
                    event = {"split": "train", "step": step, "epoch": epoch, **values,
                             "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(norm),
                             "samples_per_s": (step - last_log[1]) * cfg.data.batch_size / (now - last_log[0]),
                             "skipped_steps": skipped_total, "time": clock()}
                    log.record(event)
                    log.progress(step, total_steps)
                    running.zero_()
                    last_log = (now, step)
                if step >= total_steps:
                    break
            train_time += time.perf_counter() - t0

            last_epoch = step >= total_steps or epoch == cfg.train.epochs - 1
            if task.val is not None and ((epoch + 1) % cfg.val.every == 0 or last_epoch):
                where["phase"] = "validation"
                val_values = evaluate(cfg, dist, module, task.val, loss_fn, metrics, precision)
                log.record({"split": "val", "step": step, "epoch": epoch, **val_values, "time": clock()})
                improved = stopper.update(val_values[cfg.early_stop.monitor[4:]], epoch, step)
                # Rank 0 decides; its early-stopping state is copied to every rank, so all stop together.
                improved, stopped_early, state = dist.broadcast_object(
                    (improved, stopper.should_stop, stopper.state_dict()))
                stopper.load_state_dict(state)
                if cfg.sched.name == "plateau":
                    scheduler.step(val_values[cfg.early_stop.monitor[4:]])
                if env.is_main and cfg.checkpoint.save_best and improved:
                    ckpt.save(ckpt_dir / "best.pt", checkpoint_state())
            if env.is_main and cfg.checkpoint.save_last:
                ckpt.save(ckpt_dir / "last.pt", checkpoint_state())
            if stopped_early:
                break
            last_log = (time.perf_counter(), step)  # throughput excludes validation and saving
            where["phase"] = "training"

    where["phase"] = "the final evaluation"
    restored = False
    if cfg.early_stop.restore_best and cfg.checkpoint.save_best and stopper.best_epoch is not None:
        if env.is_main:
            ckpt.load_model_state(module, ckpt.load(ckpt_dir / "best.pt"), ckpt_dir / "best.pt")
        dist.broadcast_module(module)
        restored = True
    test_values = evaluate(cfg, dist, module, task.test, loss_fn, metrics, precision) if task.test is not None else None
    if test_values is not None:
        log.record({"split": "test", "step": step, "epoch": epoch, **test_values, "time": clock()})
    summary = {
        "world_size": env.world_size, "epochs_completed": step // steps_per_epoch, "steps": step,
        "stopped_early": stopped_early, "monitor": cfg.early_stop.monitor, "best_value": stopper.best,
        "best_epoch": stopper.best_epoch, "best_step": stopper.best_step, "restored_best": restored,
        "val": val_values, "test": test_values, "skipped_steps": skipped_total,
        "samples_per_s": step * cfg.data.batch_size / train_time if train_time else None,
        "time_to_first_step_s": first_step_time, "wall_time_s": clock(),
    }
    log.summary(summary)
    log.close()
    return summary

