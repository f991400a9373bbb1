"""The training run: set-up, one readable loop, and the end (best weights, test, summary).

`run` does everything that needs no process group (config checks, the task, the pre-flight check),
then `Training` holds the run's parts and its schedule: epochs of optimizer steps (step.py), logging,
validation, early stopping, checkpoints (one `RunState` lists what they hold).
The loop has no per-step collective or host sync of its own (but a sequence loss's token count, summed in the
background on the control group: step.py): train sums stay on the device and are reduced only every
`train.log_every` steps, and with `train.nonfinite: stop` the weights are checked
for NaN/Inf in the same reduction (and at each epoch's end), not at every step. Validation results
and stop decisions come from rank 0.
"""
from __future__ import annotations

import functools
import gc
import itertools
import json
import math
import os
import time
import traceback
from pathlib import Path
import warnings
from typing import Callable

import torch

from . import checkpoint as ckpt
from . import config as config_mod
from . import configfile
from . import grad_norms, observe
from . import strategy as strategy_mod
from . import task as task_mod
from .batch import Forward, to_device
from .task import user_error
from .config import Config
from .data import (Steps, StreamPosition, StreamSteps, check_batch_size, micro_batch_size, pinned, stream_length,
                   stream_train_loader, train_loader)
from .stream import is_stream
from .dist import Dist, DistEnv, detect, explain_failure, in_callers_group
from .preflight import (check_optimizer, check_run_length, check_strategy, check_sync_batchnorm, check_val_mode,
                        prepare, take_run_dir)
from .early_stop import EarlyStopping
from .evaluation import Evaluator
from .lock import RunLock
from .losses import Sums
from .models import convert_sync_batchnorm, on_meta
from .optim import build_optimizer, build_scheduler, nonfinite_count
from .precision import Precision
from .preempt import Preempted, Preemption
from .runlog import Clock, ConsoleLogger, Loggers, NullLogger, RunDirLogger, archive, prefix_warnings, warn
from .state import (Progress, RngState, RunState, check_compatible, cpu_rng, rank_seed, resume_path,
                    seed_everything, set_cpu_rng)
from .step import TrainStep

class NonFiniteError(RuntimeError):
    """Training hit NaN/Inf gradients with `train.nonfinite: stop`; raised on every rank at the same step."""


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
    micro_batch_size(cfg.data, env.world_size, cfg.train.grad_accum_steps)  # fail before any process group
    check_sync_batchnorm(cfg, env.world_size)
    check_strategy(cfg, env.world_size)
    device, backend, task, forward, metrics = prepare(cfg, env, task_fn)
    check_batch_size(task.train, cfg.data)
    check_run_length(cfg, task)
    check_val_mode(cfg, task)
    check_optimizer(cfg, task)
    seed_everything(rank_seed(cfg.seed, env.rank))
    if not env.is_main:
        prefix_warnings(env.rank)
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
        phase, step = (training.phase, training.progress.step) if training else ("start-up", 0)
        timeout = f"{training.dist.timeout_key}={training.dist.timeout_s:g}" if training else \
            f"dist.init_timeout_s={cfg.dist.init_timeout_s:g}"
        explained = explain_failure(e, env, phase, step, timeout, recorded)
        if explained is None:
            raise
        raise explained from e
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        if training is not None:
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


def planned_steps(tc: config_mod.TrainConfig, steps_per_epoch: int | None) -> int | None:
    """The run's optimizer steps: epochs x steps per epoch, at most train.max_steps; None when unknown (a stream
    without a length, and no max_steps)."""
    if steps_per_epoch is None:
        return tc.max_steps
    return min(tc.epochs * steps_per_epoch, tc.max_steps or tc.epochs * steps_per_epoch)


def _as_is(batch):
    return batch


def _timed(iterable, rates: observe.Rates):
    """Yield from iterable, adding the time spent waiting for each item to the log interval's wait for data; a
    failure of the user's dataset is a TaskError that names it."""
    it = iter(iterable)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise user_error(e, "the training data") from e
        rates.data_wait_s += time.perf_counter() - t
        yield item


class Training:
    """One run on this rank: its parts (built here), its loop (`fit`) and its end (`finish`)."""

    def __init__(self, cfg: Config, dist: Dist, task: task_mod.Task, forward: Forward, metrics: dict):
        env, device, tc = dist.env, dist.device, cfg.train
        self.cfg, self.dist, self.task, self.phase, self.clock = cfg, dist, task, "start-up", Clock()
        self.module = task.model if on_meta(task.model) else task.model.to(device)  # meta: the strategy's to build
        if cfg.dist.sync_batchnorm:
            self.module = convert_sync_batchnorm(self.module)
        self.strategy = strategy_mod.build(cfg, dist)  # ddp or fsdp: everything the loop must not branch on
        self.model = model = self.strategy.wrap(self.module, task.init)
        self.watched = ckpt.watched(self.module)  # what "the weights are finite" means (checkpoint.py)
        self.optimizer = build_optimizer(self.module, cfg.optim, task.optimizer)
        self.progress = Progress()
        self.stream, pin = is_stream(task.train), pinned(cfg.data, device, forward.cpu_batches)
        # A batch of CPU tensors on a CPU run is where it must be already: not walked through at every micro-batch.
        self.place = _as_is if device.type == "cpu" and forward.cpu_batches else \
            functools.partial(to_device, device=device)
        if self.stream:  # an epoch is one pass, as long as the stream lasts; its length only when it says
            self.loader, self.sampler = stream_train_loader(task.train, cfg.data, env, tc.grad_accum_steps, pin,
                                                            task.collate), None
            length = stream_length(task.train)
            self.steps_per_epoch = None if length is None else length // cfg.data.batch_size
            # the reads' own RNG (StreamSteps), seeded per rank and pass far from the training's (rank seed + step)
            self.position = StreamPosition(self.loader, self.progress, rank_seed(cfg.seed, env.rank) + 2**40)
        else:
            self.loader, self.sampler = train_loader(task.train, cfg.data, env, tc.grad_accum_steps, cfg.seed, pin,
                                                     task.collate)
            self.steps_per_epoch = self.sampler.num_samples // self.loader.batch_size // tc.grad_accum_steps
        self.total_steps = planned_steps(tc, self.steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, cfg.sched, self.total_steps, cfg.optim.lr, task.scheduler,
                                         cfg.early_stop.mode)
        self.precision = Precision(tc.precision, device)
        self.stopper = EarlyStopping(cfg.early_stop.mode, cfg.early_stop.patience, cfg.early_stop.min_delta)
        self.sums = Sums(metrics, device)
        self.rank_time = observe.RankTime(device) if env.world_size > 1 else observe.Untimed()  # read at log steps
        self.stragglers = observe.Stragglers()
        layer_norms = None
        if tc.log_grad_norms:  # per layer, at log steps; under fsdp one all-reduce makes the shards' norms whole
            layer_norms = functools.partial(grad_norms.layer_norms, grad_norms.layers(self.module),
                                            dist if self.strategy.sharded else None)
        self.step = TrainStep(torch.compile(model, backend=tc.compile_backend) if tc.compile else model,
                              self.module, forward, self.optimizer, self.scheduler, self.precision, tc,
                              cfg.optim.l1, self.strategy.no_sync(), self.rank_time, layer_norms, dist)
        # FLOPs per optimizer step: a forward counted in the pre-flight check, times 3 (the backward is two)
        self.flops_per_sample, self.peak_flops = 3 * forward.flops_per_sample, observe.peak_flops(device, tc.peak_flops)
        self.profile = observe.Profile(tc.profile, tc.profile_ranks, env.rank, cfg.run_dir)
        observe.start_memory_history(device, tc.memory_snapshot)
        self.evaluate = Evaluator(dist, forward, metrics, self.precision, cfg.val.mode, cfg.data, task.collate,
                                  lockstep=self.strategy.sharded)
        self.state = RunState(
            shared={**self.strategy.state_parts(self.module, self.optimizer), "scheduler": self.scheduler,
                    "precision": self.precision, "early_stop": self.stopper, "progress": self.progress},
            per_rank={"rng": RngState(device, self._reseed), "running": self.sums,
                      **self.strategy.per_rank_parts(), **({"stream": self.position} if self.stream else {})},
            dist=dist)
        self.ckpt_dir = cfg.run_dir / "checkpoints"
        self.val_every = cfg.val.every_steps if task.val is not None else None  # val.every_steps, where there is a val set
        self.resumed_from = resume_path(cfg, dist)
        tracking = self._resume() if self.resumed_from is not None else None
        self.done = self.finished_summary()
        self.log = NullLogger() if self.done is not None else self._loggers(tracking)
        self.preemption = Preemption(cfg.preempt.signals, dist)
        self.rates = observe.Rates(self.progress.step)  # this attempt's
        self.finite_at = self.progress.step  # the last step at which the weights were seen finite
        self.norm: torch.Tensor | None = torch.zeros(())
        self.last_loss: torch.Tensor | None = None  # the latest micro-batch's
        self.steps: Steps | None = None  # the epoch in progress, in whole steps

    def _reseed(self, rank: int) -> None:
        seed_everything(rank_seed(self.cfg.seed, rank) + self.progress.step)

    def _resume(self) -> dict:
        """Load the checkpoint into every part; return its tracking ids (wandb's run)."""
        saved = ckpt.load(self.resumed_from)
        if "config" not in saved or "progress" not in saved:
            raise ckpt.CheckpointError(
                f"checkpoint '{self.resumed_from}': holds the best validation's weights alone, not a run's state to "
                f"continue; resume from a step checkpoint (checkpoints/step-*), or test these weights with "
                f"`ddptrain eval`")
        check_compatible(saved["config"], config_mod.to_dict(self.cfg), self.resumed_from,
                         self.task.reads_model_config)
        self.state.load_state_dict(saved, self.resumed_from)
        self.strategy.load(self.resumed_from, self.module, self.optimizer)
        if self.dist.env.is_main:
            aside = ckpt.set_aside_newer(self.ckpt_dir, self.progress.step, self.strategy.name("best"))
            if aside is not None:
                warn(f"resumed at step {self.progress.step}, before the newest checkpoints of '{self.ckpt_dir}': "
                     f"those past it are moved to '{aside}' and never resumed from")
        return saved.get("tracking", {})

    def _loggers(self, tracking: dict | None):
        """Rank 0: the run directory, the console and, if enabled, wandb (continuing the resumed run's)."""
        cfg = self.cfg
        if not self.dist.env.is_main:
            return NullLogger()
        if tracking is None:
            archive(cfg.run_dir)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.yaml").write_text(configfile.dump_yaml(cfg))
        run_dir = RunDirLogger(cfg.run_dir, self.progress.records if tracking is not None else None)
        loggers = [run_dir, ConsoleLogger(self.total_steps, self.progress.step)]
        if cfg.wandb.enabled:
            from .tracking import WandbLogger
            loggers.append(WandbLogger(cfg, (tracking or {}).get("wandb_run_id"), replayed=run_dir.replayed))
        return Loggers(*loggers)

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self, before_micro_step: Callable | None = None) -> dict:
        """Train to the end (or an early stop), test, and return the summary. Call on all ranks."""
        self.dist.set_timeout(self.cfg.dist.timeout_s)
        p = self.progress
        if self.done is not None:  # resumed at the end of a completed run: nothing to do, nothing to rewrite
            self.preemption.close()
            return self.done
        try:
            with warnings.catch_warnings():
                # A step skipped by the gradient scaler makes torch warn that the schedule stepped first.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                for epoch in range(p.epoch + 1 if p.epoch_done else p.epoch, self.cfg.train.epochs):
                    if self.reached_end():
                        if not p.epoch_complete:  # resumed from the run's last step, saved before its epoch's end
                            p.pass_ended = not self.stream and p.step_in_epoch == self.steps_per_epoch
                            p.passes += p.pass_ended
                            self.end_epoch(epoch)
                        break
                    self.phase = "training"
                    self.train_epoch(epoch, before_micro_step)
                    self.end_epoch(epoch)
            self.profile.close()
            self.preemption.close()
        except Preempted:
            self.profile.close()  # the trace of the steps it recorded
            self.preemption.close()
            self.log.summary(self.summary("preempted"))
            self.log.close()
            if self.dist.env.is_main and self.cfg.preempt.requeue:
                from .slurm import requeue_and_log
                requeue_and_log()
            raise
        except BaseException:
            self.preemption.close(wait=False)
            self.log.close(failed=True)  # flush what the trackers hold: a crash must not lose the logged history
            raise
        return self.finish()

    def train_epoch(self, epoch: int, before_micro_step: Callable | None) -> None:
        """The optimizer steps of one epoch (the rest of it, when resumed mid-epoch)."""
        p, k = self.progress, self.cfg.train.grad_accum_steps
        if epoch != p.epoch:
            p.epoch, p.step_in_epoch, p.pass_ended = epoch, 0, False
        p.epoch_complete = False  # also where a longer run continues the epoch in which max_steps had ended it
        resumed_mid_pass = p.step_in_epoch > 0
        self.loader.generator.manual_seed(rank_seed(self.cfg.seed, self.dist.env.rank) + epoch)
        if self.stream:  # the pass ends where the first rank's part of the stream does
            self.position.start_pass(epoch)
            left = None if self.total_steps is None else self.total_steps - p.step
            self.steps = StreamSteps(_timed(self.loader, self.rates), k, self.dist, self.position, left)
        else:
            self.sampler.set_epoch(epoch)
            self.sampler.start = p.step_in_epoch * k * self.loader.batch_size
            left = (self.steps_per_epoch - p.step_in_epoch) * k
            self.steps = Steps(_timed(itertools.islice(self.loader, left), self.rates), k, left // k)
        self.model.train()
        started, micro_step, ran_out = time.perf_counter(), 0, False
        try:
            for batches in self.steps:
                self.profile.before_step(p.step + 1)
                self.step.begin(batches)
                for i, batch in enumerate(batches):
                    if before_micro_step is not None:
                        batch = before_micro_step(p.step, micro_step, batch)
                    try:
                        computed = self.step.micro_step(self.place(batch), i == k - 1)
                    except torch.cuda.OutOfMemoryError as e:
                        raise self._out_of_memory(e) from None
                    except Exception as e:
                        raise self.strategy.explained(e, p.step + 1) or user_error(
                            e, f"the model or the loss, at step {p.step + 1} on rank {self.dist.env.rank},") from e
                    self.sums.add(computed)
                    self.last_loss = computed.loss
                    del computed  # its output (an LM's logits) is freed before the optimizer step, not kept to the next
                    micro_step += 1
                self.steps.read_ahead()  # a stream reads its next steps while this one's optimizer steps
                done = self.after_step(epoch)
                if p.step == self.rates.start_step + 1:
                    self.rates.warm_up_s = self.rates.train_s + time.perf_counter() - started
                if done:
                    break
            else:  # the data ran out: one whole pass
                ran_out = True
                if self.stream and p.step_in_epoch == 0 and not resumed_mid_pass:
                    raise task_mod.TaskError(
                        f"the training stream gave no whole step in pass {epoch}: each rank needs {k} x "
                        f"{self.loader.batch_size} samples per step (data.batch_size={self.cfg.data.batch_size} over "
                        f"{self.dist.env.world_size} ranks and train.grad_accum_steps={k})")
        finally:
            self.steps.settle()
        p.pass_ended = ran_out or self.steps.ends_pass()
        p.passes += p.pass_ended
        self.rates.train_s += time.perf_counter() - started

    def _out_of_memory(self, e: BaseException) -> task_mod.TaskError:
        """A CUDA out-of-memory error as one line with the figures and what to try (this rank's alone)."""
        snapshot_dir = self.cfg.run_dir if self.cfg.train.memory_snapshot else None
        error = task_mod.TaskError(observe.out_of_memory(e, self.dist.device, self.progress.step, self.dist.env.rank,
                                                         snapshot_dir))
        error.rank_specific = True
        return error

    def reached_end(self) -> bool:
        """Stopped early, or all planned steps or epochs done."""
        p = self.progress
        return (p.stopped_early or (self.total_steps is not None and p.step >= self.total_steps)
                or (p.epoch_done and p.epoch >= self.cfg.train.epochs - 1))

    def last_epoch(self, epoch: int) -> bool:
        """`epoch` is the run's last: its last epoch, or the one in which max_steps ends it."""
        return (self.total_steps is not None and self.progress.step >= self.total_steps) or \
            epoch == self.cfg.train.epochs - 1

    def saves_at_epoch_end(self, epoch: int) -> bool:
        """end_epoch writes a checkpoint for `epoch` (checkpoint.every_epochs, the last epoch, an early stop)."""
        every = self.cfg.checkpoint.every_epochs
        return bool(every) and ((epoch + 1) % every == 0 or self.last_epoch(epoch) or self.progress.stopped_early)

    def epoch_save_follows(self, epoch: int, done: bool) -> bool:
        """The step just taken ends the epoch, whose checkpoint is written at this step once its validation is
        done: a step checkpoint here waits for it (one write of the step, not a second replacing the first)."""
        return (done or self.progress.stopped_early or self.steps.ends_pass()) and self.saves_at_epoch_end(epoch)

    def after_step(self, epoch: int) -> bool:
        """The optimizer step, then its bookkeeping: log, preemption, checkpoint. True when training is done."""
        p, tc = self.progress, self.cfg.train
        step = p.step + 1
        log_now = step % tc.log_every == 0 or step == self.total_steps
        self.strategy.before_update()  # an asynchronous checkpoint's copy of the weights is done
        self.norm, stepped = self.step.optimizer_step(measure=log_now)
        p.step = step
        p.step_in_epoch += 1
        self.profile.after_step(step)
        if self.rates.first_step_time is None:
            self.rates.first_step_time = self.clock()
            self.strategy.prepare(self.module, self.optimizer)  # checkpoint.async_save: its copy made ahead
        if stepped:
            p.skipped_in_a_row = 0
        else:
            self.skipped()
        if log_now:
            self.log_train(epoch)
        done = self.total_steps is not None and step >= self.total_steps
        if self.val_every and step % self.val_every == 0 and not done:
            self.validate_mid_epoch(epoch)
        preempted = self.preemption.poll()
        every = self.cfg.checkpoint.every_steps
        if preempted or (every and step % every == 0 and not self.epoch_save_follows(epoch, done)):
            self.save_checkpoint()
        if preempted:
            self._collectively(self.strategy.wait)  # the checkpoint must be whole before the process ends
            raise Preempted(f"{self.preemption.signal_name}: checkpoint written at step {p.step}")
        return done or p.stopped_early

    def skipped(self) -> None:
        """The optimizer step was skipped for non-finite gradients (fp16's scaler, or train.nonfinite: skip)."""
        p, limit = self.progress, self.cfg.train.max_skips_in_a_row
        self.strategy.skipped()
        p.skipped_in_a_row += 1
        p.skipped_total += 1
        # A few skipped steps are normal under fp16 (the scaler is finding its scale) and the point of
        # nonfinite=skip; many in a row mean the run has diverged.
        if p.skipped_in_a_row >= limit:
            self.nonfinite_stop(f"{p.skipped_in_a_row} steps in a row skipped for non-finite gradients "
                                f"(train.max_skips_in_a_row={limit})")

    def validate_mid_epoch(self, epoch: int) -> None:
        """val.every_steps: validate within the epoch; its time counts neither as training nor in the next log."""
        started = time.perf_counter()
        self.validate(epoch)
        self.phase = "training"
        self.rates.pause(time.perf_counter() - started, in_epoch=True)

    def log_train(self, epoch: int) -> None:
        """Reduce the train sums (the loop's own collective, every log_every steps) and record them. Call on all ranks."""
        p, sums, env, rates = self.progress, self.sums, self.dist.env, self.rates
        steps = p.step - rates.log_step
        own = None  # each rank's own time per step (observe.RankTime), in its slot: it rides on the reduction
        if env.world_size > 1:
            own = torch.zeros(env.world_size, dtype=torch.float64)
            own[env.rank] = (rates.data_wait_s + self.rank_time.take()) / max(steps, 1)
        own = sums.reduce(self.dist, nonfinite=nonfinite_count(self.step.params), ride=own)  # finiteness agreed too
        values = sums.values()  # on the host: the device has done the interval's work (rates are not queueing rates)
        now = time.perf_counter()
        elapsed, tokens = now - rates.log_time - rates.paused_s, sums.tokens()
        event = {"split": "train", "step": p.step, "epoch": epoch, **values,
                 "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": float(self.norm),
                 "skipped_steps": p.skipped_total,
                 "samples_per_s": steps * self.cfg.data.batch_size / elapsed,
                 "data_wait_share": rates.data_wait_s / elapsed, "time": self.clock()}
        if tokens:
            event["tokens_per_s"] = tokens / elapsed
            rates.tokens += tokens
        if self.peak_flops and self.flops_per_sample:
            event["mfu"] = self._mfu(event["samples_per_s"])
        if own is not None and env.is_main:
            event.update(self.stragglers.fields(own.tolist()))
        if self.step.norms is not None:
            event["grad_norms"] = self.step.norms
        event.update(observe.memory_fields(self.dist.device))
        self.log.record(event)
        self.log.progress(p.step, self.total_steps)
        self.check_finite(sums.all_finite())
        sums.zero()
        rates.next_interval(now, p.step)

    def end_epoch(self, epoch: int) -> None:
        """After an epoch's steps: the finite check, validation, early stopping, the epoch checkpoint."""
        p, cfg, started = self.progress, self.cfg, time.perf_counter()
        if cfg.train.nonfinite == "stop" and self.finite_at != p.step:  # validation would hide it
            count = nonfinite_count(self.step.params).double().reshape(1)
            self.check_finite(self.dist.all_reduce_sum(count)[0] == 0)
        validated = p.last_val is not None and p.val_step == p.step  # by val.every_steps, or before a preemption
        if self.task.val is not None and ((epoch + 1) % cfg.val.every == 0 or self.last_epoch(epoch)) and not validated:
            self.validate(epoch)
        p.epoch_complete = True
        if self.saves_at_epoch_end(epoch):
            self.phase = "checkpointing"
            self.save_checkpoint()
        self.rates.pause(time.perf_counter() - started)  # the train log's rates exclude validation and saving

    def validate(self, epoch: int) -> None:
        """Validate, then early stopping and best.pt from rank 0's decision. Call on all ranks."""
        p, cfg = self.progress, self.cfg
        self.phase = "validation"
        # A validation leaves the training's random streams as they were (a loader's iterator draws its seed
        # from them), so when and how often a run validates does not change its training.
        training_rng = cpu_rng()
        p.last_val = values = self.evaluate(self.module, self.task.val)
        set_cpu_rng(training_rng)
        p.val_step = p.step
        self.log.record({"split": "val", "step": p.step, "epoch": epoch, **values, "time": self.clock()})
        monitored = values[cfg.early_stop.monitor[4:]]
        improved = self.stopper.update(monitored, epoch, p.step)
        # Rank 0 decides; its early-stopping state is copied to every rank, so all stop together.
        improved, p.stopped_early, stopper_state = self.dist.broadcast_object(
            (improved, self.stopper.should_stop, self.stopper.state_dict()))
        self.stopper.load_state_dict(stopper_state)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(monitored)
        if cfg.checkpoint.save_best and improved and self.strategy.finite(self.watched):
            self._collectively(lambda: self.strategy.save_weights(
                self.ckpt_dir / self.strategy.name("best"), self.module,
                # and the config, so that `ddptrain eval` can tell a config.yaml edited since from the one trained with
                {"epoch": epoch, "step": p.step, "value": self.stopper.best, "config": config_mod.to_dict(cfg)}))

    def save_checkpoint(self) -> None:
        """Write the whole run state as the newest step checkpoint. Call on all ranks."""
        p = self.progress
        p.records = self.log.records
        state = self.state.state_dict()
        if not self.strategy.finite(self.watched):
            if self.dist.env.is_main:
                warn(f"step {p.step}: the weights are not finite; keeping the previous checkpoint")
            return
        if state is not None:
            state.update(config=config_mod.to_dict(self.cfg), world_size=self.dist.env.world_size,
                         tracking=self.log.tracking)

        self._collectively(lambda: self.strategy.save(self.ckpt_dir / self.strategy.name(f"step-{p.step:09d}"), state,
                                                      self.module, self.optimizer))

    def _collectively(self, write: Callable) -> None:
        """Every rank runs `write` (only what is its to write); a CheckpointError (a full disk) on any rank stops
        every rank with the same message. Call on all ranks."""
        error = None
        try:
            write()
        except ckpt.CheckpointError as e:
            error = str(e)
        error = self.dist.first_error(error)
        if error:
            raise ckpt.CheckpointError(error)

    # ---- non-finite weights ---------------------------------------------------------------------
    def check_finite(self, finite: torch.Tensor) -> None:
        """Note that the weights are finite now; with train.nonfinite=stop, stop if they are not.
        `finite` was all-reduced, so every rank takes the same branch. Call on all ranks."""
        if bool(finite):
            self.finite_at = self.progress.step
        elif self.cfg.train.nonfinite == "stop":
            self.nonfinite_stop(f"the weights became non-finite after step {self.finite_at} (a NaN/Inf loss or "
                                f"gradient)")

    def nonfinite_stop(self, what: str) -> None:
        """Write a diagnostic (rank 0) and raise NonFiniteError on every rank. Call on all ranks."""
        p, cfg = self.progress, self.cfg
        losses = self.dist.gather_object(float(self.last_loss.detach()))
        message = (f"{what}; stopped at step {p.step}, epoch {p.epoch}; set train.nonfinite=skip to skip such "
                   f"steps (it checks every step), or lower optim.lr")
        if self.dist.env.is_main:
            from .runlog import write_json_atomic
            last = ckpt.latest_valid(self.ckpt_dir)  # whole: not one a dead attempt left unmarked
            write_json_atomic(cfg.run_dir / "nonfinite.json", {
                "what": what, "step": p.step, "epoch": p.epoch,
                "grad_norm": None if self.norm is None else str(float(self.norm)),
                "lr": self.optimizer.param_groups[0]["lr"], "last_loss_per_rank": [str(v) for v in losses],
                "last_good_checkpoint": str(last) if last else None})
        raise NonFiniteError(message)

    def finished_summary(self) -> dict | None:
        """When resumed from the checkpoint at the end of a run that completed, its summary (unchanged, with
        `already_trained`), else None. Call on all ranks."""
        p, summary = self.progress, None
        if self.resumed_from is None or not self.reached_end():  # its last checkpoint may precede its end
            return None
        if self.dist.env.is_main:
            try:
                summary = json.loads((self.cfg.run_dir / "summary.json").read_text())
            except (OSError, ValueError):
                summary = None
            if summary is not None and (summary.get("status") != "completed" or summary.get("steps") != p.step):
                summary = None
        summary = self.dist.broadcast_object(summary)
        return None if summary is None else {**summary, "already_trained": True}

    # ---- the end --------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Restore the best weights (when whole), test, write the summary. Call on all ranks."""
        self.phase = "the final evaluation"
        self._collectively(self.strategy.wait)  # the last checkpoint is whole before the run says it is done
        weights, why = self.restore_best()
        test = self.evaluate(self.module, self.task.test) if self.task.test is not None else None
        if test is not None:
            self.log.record({"split": "test", "step": self.progress.step, "epoch": self.progress.epoch, **test,
                             "time": self.clock()})
        # A metric may be undefined (R^2 of a constant target); a loss that is not finite means divergence.
        bad = [f"the {split} loss" for split, values in (("val", self.progress.last_val), ("test", test))
               if values and not math.isfinite(values["loss"])]
        summary = self.summary("nonfinite" if bad else "completed", test=test, tested=weights)
        if why:
            summary["best_unusable"] = why
        self.log.summary(summary)
        self.log.close()
        if bad:  # the values were broadcast from rank 0: every rank raises
            raise NonFiniteError(f"training ended, but {', '.join(bad)} is not finite (NaN/Inf): the run diverged; "
                                 f"lower optim.lr, clip gradients (train.clip_grad_norm) or use fp32")
        return summary

    def restore_best(self) -> tuple[str, str | None]:
        """Load the best weights into every rank's model if they are whole and fit: ("best", None), else
        ("last", why). Call on all ranks."""
        cfg = self.cfg
        if not (cfg.early_stop.restore_best and cfg.checkpoint.save_best and self.stopper.best_epoch is not None):
            return "last", None
        path = self.ckpt_dir / self.strategy.name("best")
        why = self.strategy.load_weights(path, self.module)
        if why is not None:
            if self.dist.env.is_main:
                warn(f"'{path}' cannot be used ({why}); the test runs on the last weights")
            return "last", why
        return "best", None

    def summary(self, status: str, test: dict | None = None, tested: str | None = None) -> dict:
        p, s, rates = self.progress, self.stopper, self.rates
        rate = rates.steps_per_s(p.step)
        out = {
            "status": status, "world_size": self.dist.env.world_size, "strategy": self.cfg.dist.strategy,
            "epochs_completed": p.passes if self.stream else p.step // self.steps_per_epoch, "steps": p.step, "stopped_early": p.stopped_early,
            "monitor": self.cfg.early_stop.monitor, "best_value": s.best, "best_epoch": s.best_epoch,
            "best_step": s.best_step, "restored_best": tested == "best", "tested_weights": tested,
            "val": p.last_val, "test": test, "skipped_steps": p.skipped_total,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None, "resumed_at_step": rates.start_step,
            "samples_per_s": rate and rate * self.cfg.data.batch_size,
            "time_to_first_step_s": rates.first_step_time, "wall_time_s": self.clock(),
        }
        if rates.tokens:  # the logged intervals' tokens per step, at the steady rate
            out["tokens_per_s"] = rate and rate * rates.tokens_per_step()
        if self.flops_per_sample:
            out["flops_per_sample"] = self.flops_per_sample  # of training: 3 forwards
            if self.peak_flops and out["samples_per_s"]:
                out["mfu"] = self._mfu(out["samples_per_s"])
        return out

    def _mfu(self, samples_per_s: float) -> float:
        """The model FLOPs utilisation at this rate: the model's FLOPs per second over all devices' peak."""
        return samples_per_s * self.flops_per_sample / (self.peak_flops * self.dist.env.world_size)
