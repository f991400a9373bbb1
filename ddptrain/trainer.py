"""The training run: set-up, one readable loop, and the end (best weights, test, summary).

Order inside an optimizer step: k micro-batches (all but the last under `no_sync`, so gradients are
all-reduced once) -> unscale -> global grad norm (where clipping, logging or `nonfinite: skip` needs
it) -> clip -> finite check (skip mode) -> optimizer step -> schedule.
The loop has no per-step collective or host sync of its own: train loss sums stay on the device
and are reduced only every `train.log_every` steps, and with `train.nonfinite: stop` the weights are
checked for NaN/Inf in the same reduction (and at each epoch's end), not at every step. Validation
results and stop decisions come from rank 0.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import os
import time
import traceback
import warnings
from typing import Callable

import torch
from torch import nn

from . import checkpoint as ckpt
from . import config as config_mod
from . import task as task_mod
from .config import Config
from .data import train_loader, micro_batch_size
from .dist import Dist, DistEnv, detect, explain_failure, pick_device
from .early_stop import EarlyStopping
from .evaluate import evaluate
from .losses import ELEMENTWISE, as_metric, build_loss, metric_values
from .models import convert_sync_batchnorm
from .optim import build_optimizer, build_scheduler, l1_penalty, nonfinite_count, optimizer_step
from .precision import Precision
from .preempt import Preempted, Preemption
from .runlog import Clock, ConsoleLogger, Loggers, NullLogger, RunDirLogger, archive, prefix_warnings
from .state import Progress, check_compatible, rank_seed, resume_path, rng_state, seed_everything, set_rng_state

# Under fp16 a few overflowing steps are normal (the scaler is finding its scale); this many in a
# row means the run has diverged.
FP16_MAX_CONSECUTIVE_SKIPS = 20


class NonFiniteError(RuntimeError):
    """Training hit NaN/Inf gradients with `train.nonfinite: stop`; raised on every rank at the same step."""


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
        explained = explain_failure(e, env, where, cfg.dist.timeout_s)
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


def _loggers(cfg: Config, dist: Dist, total_steps: int, progress: Progress, resumed: dict | None):
    """Rank 0: the run directory, the console and, if enabled, wandb (continuing the resumed run's)."""
    if not dist.env.is_main:
        return NullLogger()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.yaml").write_text(config_mod.dump_yaml(cfg))
    run_dir = RunDirLogger(cfg.run_dir, progress.records if resumed is not None else None)
    loggers = [run_dir, ConsoleLogger(total_steps, progress.step)]
    if cfg.wandb.enabled:
        from .tracking import WandbLogger
        run_id = (resumed or {}).get("wandb_run_id")
        loggers.append(WandbLogger(cfg, run_id, skip_records=run_dir.replayed))
    return Loggers(*loggers)


def _wrap(model: nn.Module, cfg: Config, dist: Dist) -> nn.Module:
    if not dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    d = cfg.dist
    return DDP(model, device_ids=[dist.device] if dist.device.type == "cuda" else None,
               find_unused_parameters=d.find_unused_parameters, static_graph=d.static_graph,
               gradient_as_bucket_view=d.gradient_as_bucket_view, bucket_cap_mb=d.bucket_cap_mb)


def _timed(iterable, waited: list[float]):
    """Yield from iterable, adding the time spent waiting for each item to waited[0]."""
    it = iter(iterable)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - t
        yield item


def _fit(cfg: Config, dist: Dist, task: task_mod.Task, loss_fn, metrics: dict, hooks: dict, where: dict) -> dict:
    env, device, tc = dist.env, dist.device, cfg.train
    clock = Clock()
    module = task.model.to(device)
    if cfg.dist.sync_batchnorm:
        module = convert_sync_batchnorm(module)
    model = _wrap(module, cfg, dist)
    step_model = torch.compile(model, backend=tc.compile_backend) if tc.compile else model
    optimizer = build_optimizer(module, cfg.optim)
    params = list(module.parameters())
    loader, sampler = train_loader(task.train, cfg.data, env, tc.grad_accum_steps, cfg.seed, device)
    steps_per_epoch = sampler.num_samples // loader.batch_size // tc.grad_accum_steps
    total_steps = min(tc.epochs * steps_per_epoch, tc.max_steps or tc.epochs * steps_per_epoch)
    scheduler = build_scheduler(optimizer, cfg.sched, total_steps, cfg.optim.lr)
    precision = Precision(tc.precision, device)
    stopper = EarlyStopping(cfg.early_stop.mode, cfg.early_stop.patience, cfg.early_stop.min_delta)
    progress = Progress()
    # [loss sum, samples, metric sums..., non-finite weight tensors]: reduced together at log steps; the
    # last slot is filled just before and cleared just after, so checkpoints hold the others only
    running = torch.zeros(3 + sum(m.width for m in metrics.values()), dtype=torch.float64, device=device)
    ckpt_dir = cfg.run_dir / "checkpoints"

    resumed_from, tracking = resume_path(cfg, dist), None
    if resumed_from is not None:
        state = ckpt.load(resumed_from)
        check_compatible(state["config"], config_mod.to_dict(cfg), resumed_from)
        ckpt.load_model_state(module, state, resumed_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        precision.load_state_dict(state["precision"])
        stopper.load_state_dict(state["early_stop"])
        progress.load_state_dict(state["progress"])
        tracking = state.get("tracking", {})
        per_rank = state["ranks"]
        if len(per_rank) == env.world_size:
            set_rng_state(per_rank[env.rank]["rng"], device)
            running[:-1].copy_(per_rank[env.rank]["running"])
        else:  # another world size: same data order, new random streams (see state.py)
            seed_everything(rank_seed(cfg.seed, env.rank) + progress.step)
            if env.is_main:
                running[:-1].copy_(sum(r["running"] for r in per_rank))
        del state
    elif env.is_main:
        archive(cfg.run_dir)
    log = _loggers(cfg, dist, total_steps, progress, tracking)
    preemption = Preemption(cfg.preempt.signals, dist)

    def save_checkpoint() -> None:
        """Write the whole run state as the newest step checkpoint. Call on all ranks."""
        per_rank = dist.gather_object({"rng": rng_state(device), "running": running[:-1].cpu()})  # the last slot is 0 here
        if not env.is_main:
            return
        if not ckpt.finite(module):
            print(f"ddptrain: warning: step {progress.step}: the weights are not finite; keeping the previous "
                  f"checkpoint", flush=True)
            return
        progress.records = log.records
        ckpt.save(ckpt_dir / f"step-{progress.step:09d}.pt", {
            "model": module.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "precision": precision.state_dict(),
            "early_stop": stopper.state_dict(), "progress": progress.state_dict(), "ranks": per_rank,
            "config": config_mod.to_dict(cfg), "world_size": env.world_size, "tracking": log.tracking})
        ckpt.prune(ckpt_dir, cfg.checkpoint.keep_last)

    start_step, train_time, first_step_time = progress.step, 0.0, None
    finite_at = progress.step  # the last step at which the weights were seen finite
    last_log, data_wait = (time.perf_counter(), progress.step), [0.0]
    norm = torch.zeros(())
    dist.set_timeout(cfg.dist.timeout_s)
    where["phase"] = "training"
    try:
        with warnings.catch_warnings():
            # A step skipped by the gradient scaler makes torch warn that the schedule stepped first.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            first_epoch = progress.epoch + 1 if progress.epoch_complete else progress.epoch
            for epoch in range(first_epoch, tc.epochs):
                if progress.stopped_early or progress.step >= total_steps:
                    break
                if epoch != progress.epoch:
                    progress.epoch, progress.step_in_epoch, progress.epoch_complete = epoch, 0, False
                sampler.set_epoch(epoch)
                sampler.start = progress.step_in_epoch * tc.grad_accum_steps * loader.batch_size
                loader.generator.manual_seed(rank_seed(cfg.seed, env.rank) + epoch)
                model.train()
                t0 = time.perf_counter()
                micro_batches = _timed(itertools.islice(
                    loader, (steps_per_epoch - progress.step_in_epoch) * tc.grad_accum_steps), data_wait)
                for micro_step, (x, y) in enumerate(micro_batches):
                    if "before_micro_step" in hooks:
                        x, y = hooks["before_micro_step"](progress.step, micro_step, x, y)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    sync = (micro_step + 1) % tc.grad_accum_steps == 0
                    with contextlib.nullcontext() if sync or not dist.active else model.no_sync():
                        with precision.autocast():
                            out = step_model(x)
                            loss = loss_fn(out, y)
                            objective = loss + l1_penalty(module, cfg.optim.l1) if cfg.optim.l1 else loss
                        # Each micro-batch loss is a mean over its samples; dividing by their number makes
                        # the accumulated gradient the mean over the whole step's batch.
                        precision.backward(objective / tc.grad_accum_steps if tc.grad_accum_steps > 1 else objective)
                    with torch.no_grad():
                        running[0].add_(loss.detach(), alpha=len(y))
                        running[1] += len(y)
                        offset = 2
                        for m in metrics.values():
                            running[offset:offset + m.width] += m.batch_stats(out.detach(), y).to(running)
                            offset += m.width
                    if not sync:
                        continue

                    log_now = (progress.step + 1) % tc.log_every == 0 or progress.step + 1 == total_steps
                    norm, stepped = optimizer_step(params, optimizer, precision, cfg, measure=log_now)
                    if cfg.sched.name != "plateau":
                        scheduler.step()
                    progress.step += 1
                    progress.step_in_epoch += 1
                    where["step"] = progress.step
                    first_step_time = first_step_time or clock()
                    progress.skipped_in_a_row = 0 if stepped else progress.skipped_in_a_row + 1
                    progress.skipped_total += not stepped
                    limit = FP16_MAX_CONSECUTIVE_SKIPS if precision.scaler is not None else 0
                    if progress.skipped_in_a_row > limit and tc.nonfinite == "stop":
                        _nonfinite_stop(cfg, dist, progress, norm, loss, optimizer,
                                        f"{progress.skipped_in_a_row} steps in a row skipped by the fp16 gradient "
                                        f"scaler for non-finite gradients")
                    if log_now:
                        running[-1] = nonfinite_count(params)  # rides on the reduction, so all ranks agree
                        dist.all_reduce_sum(running)  # the loop's own collective, every log_every steps
                        now = time.perf_counter()
                        event = {"split": "train", "step": progress.step, "epoch": epoch,
                                 **metric_values(running, metrics), "lr": optimizer.param_groups[0]["lr"],
                                 "grad_norm": float(norm), "skipped_steps": progress.skipped_total,
                                 "samples_per_s": (progress.step - last_log[1]) * cfg.data.batch_size / (now - last_log[0]),
                                 "data_wait_share": data_wait[0] / (now - last_log[0]), "time": clock()}
                        if device.type == "cuda":
                            event["gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                        log.record(event)
                        log.progress(progress.step, total_steps)
                        finite_at = _check_finite(cfg, dist, progress, running[-1] == 0, finite_at, norm, loss, optimizer)
                        running.zero_()
                        last_log, data_wait[0] = (now, progress.step), 0.0
                    preempted = preemption.poll()
                    every = cfg.checkpoint.every_steps
                    if preempted or (every and progress.step % every == 0):
                        save_checkpoint()
                    if preempted:
                        raise Preempted(f"{preemption.signal_name}: checkpoint written at step {progress.step}")
                    if progress.step >= total_steps:
                        break
                train_time += time.perf_counter() - t0
                if tc.nonfinite == "stop" and finite_at != progress.step:  # validation would hide it
                    count = nonfinite_count(params).double().reshape(1)
                    finite_at = _check_finite(cfg, dist, progress, dist.all_reduce_sum(count)[0] == 0, finite_at,
                                              norm, loss, optimizer)

                last_epoch = progress.step >= total_steps or epoch == tc.epochs - 1
                if task.val is not None and ((epoch + 1) % cfg.val.every == 0 or last_epoch):
                    where["phase"] = "validation"
                    progress.last_val = val_values = evaluate(cfg, dist, module, task.val, loss_fn, metrics, precision)
                    log.record({"split": "val", "step": progress.step, "epoch": epoch, **val_values, "time": clock()})
                    improved = stopper.update(val_values[cfg.early_stop.monitor[4:]], epoch, progress.step)
                    # Rank 0 decides; its early-stopping state is copied to every rank, so all stop together.
                    improved, progress.stopped_early, es_state = dist.broadcast_object(
                        (improved, stopper.should_stop, stopper.state_dict()))
                    stopper.load_state_dict(es_state)
                    if cfg.sched.name == "plateau":
                        scheduler.step(val_values[cfg.early_stop.monitor[4:]])
                    if env.is_main and cfg.checkpoint.save_best and improved and ckpt.finite(module):
                        ckpt.save(ckpt_dir / "best.pt", {"model": module.state_dict(), "epoch": epoch,
                                                         "step": progress.step, "value": stopper.best})
                progress.epoch_complete = True
                every = cfg.checkpoint.every_epochs
                if every and ((epoch + 1) % every == 0 or last_epoch or progress.stopped_early):
                    where["phase"] = "checkpointing"
                    save_checkpoint()
                last_log, data_wait[0] = (time.perf_counter(), progress.step), 0.0  # excludes validation, saving
                where["phase"] = "training"
        preemption.close()
    except Preempted:
        preemption.close()
        log.summary(_summary(cfg, env, progress, stopper, steps_per_epoch, start_step, train_time,
                             first_step_time, clock, resumed_from, status="preempted"))
        log.close()
        if env.is_main and cfg.preempt.requeue:
            from .slurm import requeue_and_log
            requeue_and_log()
        raise
    except BaseException:
        preemption.close(wait=False)
        log.close(failed=True)  # flush what the trackers hold: a crash must not lose the logged history
        raise

    where["phase"] = "the final evaluation"
    restored = False
    if cfg.early_stop.restore_best and cfg.checkpoint.save_best and stopper.best_epoch is not None:
        if env.is_main:
            ckpt.load_model_state(module, ckpt.load(ckpt_dir / "best.pt"), ckpt_dir / "best.pt")
        dist.broadcast_module(module)
        restored = True
    test_values = evaluate(cfg, dist, module, task.test, loss_fn, metrics, precision) if task.test is not None else None
    if test_values is not None:
        log.record({"split": "test", "step": progress.step, "epoch": progress.epoch, **test_values, "time": clock()})
    summary = _summary(cfg, env, progress, stopper, steps_per_epoch, start_step, train_time, first_step_time,
                       clock, resumed_from, status="completed", test=test_values, restored=restored)
    log.summary(summary)
    log.close()
    return summary


def _summary(cfg, env, progress, stopper, steps_per_epoch, start_step, train_time, first_step_time, clock,
             resumed_from, status, test=None, restored=False) -> dict:
    return {
        "status": status, "world_size": env.world_size, "epochs_completed": progress.step // steps_per_epoch,
        "steps": progress.step, "stopped_early": progress.stopped_early, "monitor": cfg.early_stop.monitor,
        "best_value": stopper.best, "best_epoch": stopper.best_epoch, "best_step": stopper.best_step,
        "restored_best": restored, "val": progress.last_val, "test": test, "skipped_steps": progress.skipped_total,
        "resumed_from": str(resumed_from) if resumed_from else None, "resumed_at_step": start_step,
        "samples_per_s": (progress.step - start_step) * cfg.data.batch_size / train_time if train_time else None,
        "time_to_first_step_s": first_step_time, "wall_time_s": clock(),
    }


def _check_finite(cfg, dist, progress, finite, finite_at, norm, loss, optimizer) -> int:
    """The step at which the weights were last seen finite; with train.nonfinite=stop, stop if they are not.
    `finite` was all-reduced, so every rank takes the same branch. Call on all ranks."""
    if bool(finite):
        return progress.step
    if cfg.train.nonfinite == "stop":
        _nonfinite_stop(cfg, dist, progress, norm, loss, optimizer,
                        f"the weights became non-finite after step {finite_at} (a NaN/Inf loss or gradient)")
    return finite_at


def _nonfinite_stop(cfg, dist, progress, norm, loss, optimizer, what: str):
    """Write a diagnostic (rank 0) and raise NonFiniteError on every rank. Call on all ranks."""
    losses = dist.gather_object(float(loss))
    message = (f"{what}; stopped at step {progress.step}, epoch {progress.epoch}; set train.nonfinite=skip to "
               f"skip such steps (it checks every step), or lower optim.lr")
    if dist.env.is_main:
        from .runlog import write_json_atomic
        last = ckpt.step_files(cfg.run_dir / "checkpoints")
        write_json_atomic(cfg.run_dir / "nonfinite.json", {
            "what": what, "step": progress.step, "epoch": progress.epoch,
            "grad_norm": None if norm is None else str(float(norm)), "lr": optimizer.param_groups[0]["lr"],
            "last_loss_per_rank": [str(v) for v in losses],
            "last_good_checkpoint": str(last[-1]) if last else None})
    raise NonFiniteError(message)
