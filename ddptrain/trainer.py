"""The training loop on this rank: `Training` builds the run's parts, then trains epochs of optimizer steps
(step.py) with logging (train_event.py), validation, early stopping and checkpoints (saving.py; one `RunState`
lists what they hold), and ends the run (results.py). `run` (run.py) starts it.
The loop has no per-step collective or host sync of its own (but a sequence loss's token count, summed in the
background on the control group: step.py): train sums stay on the device and are reduced only every
`train.log_every` steps, and with `train.nonfinite: stop` the weights are checked
for NaN/Inf in the same reduction (and at each epoch's end), not at every step (nonfinite.py). Validation results
and stop decisions come from rank 0.
"""
from __future__ import annotations

import functools
import time
import warnings
from typing import Callable

import torch

from . import checkpoint as ckpt
from . import grad_norms, nonfinite, observe, results, saving, train_event
from . import strategy as strategy_mod
from . import task as task_mod
from .batch import Forward, to_device
from .task import user_error
from .config import Config
from .data import pinned
from .dist import Dist
from .early_stop import EarlyStopping
from .evaluation import Evaluator
from .losses import Sums
from .models import convert_sync_batchnorm, on_meta
from .optim import build_optimizer, build_scheduler, nonfinite_count
from .precision import Precision
from .preempt import Preempted, Preemption
from .runlog import Clock, NullLogger, run_loggers
from .state import Progress, RngState, RunState, cpu_rng, rank_seed, resume_path, seed_everything, set_cpu_rng
from .step import TrainStep
from .steps import Steps
from .train_data import TrainData, planned_steps


def _as_is(batch):
    return batch


class Training:
    """One run on this rank: its parts (built here) and its loop (`fit`), which ends in `results.finish`."""

    def __init__(self, cfg: Config, dist: Dist, task: task_mod.Task, forward: Forward, metrics: dict):
        device, tc = dist.device, cfg.train
        self.cfg, self.dist, self.task, self.phase, self.clock = cfg, dist, task, "start-up", Clock()
        self.module = task.model if on_meta(task.model) else task.model.to(device)  # meta: the strategy's to build
        if cfg.dist.sync_batchnorm:
            self.module = convert_sync_batchnorm(self.module)
        self.strategy = strategy_mod.build(cfg, dist)  # ddp or fsdp: everything the loop must not branch on
        self.model = model = self.strategy.wrap(self.module, task.init)
        self.watched = ckpt.watched(self.module)  # what "the weights are finite" means (checkpoint.py)
        self.optimizer = build_optimizer(self.module, cfg.optim, task.optimizer)
        self.progress = Progress()
        # A batch of CPU tensors on a CPU run is where it must be already: not walked through at every micro-batch.
        self.place = _as_is if device.type == "cpu" and forward.cpu_batches else \
            functools.partial(to_device, device=device)
        self.data = TrainData(task, cfg, dist, self.progress, pinned(cfg.data, device, forward.cpu_batches))
        self.total_steps = planned_steps(tc, self.data.steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, cfg.sched, self.total_steps, cfg.optim.lr, task.scheduler,
                                         cfg.early_stop.mode)
        self.precision = Precision(tc.precision, device)
        self.stopper = EarlyStopping(cfg.early_stop.mode, cfg.early_stop.patience, cfg.early_stop.min_delta)
        self.sums = Sums(metrics, device)
        self.step = self._train_step(model, forward)
        self.evaluate = Evaluator(dist, forward, metrics, self.precision, cfg.val.mode, cfg.data, task.collate,
                                  lockstep=self.strategy.sharded)
        self._resume()
        self.preemption = Preemption(cfg.preempt.signals, dist)
        self.rates = observe.Rates(self.progress.step)  # this attempt's
        self.finite_at = self.progress.step  # the last step at which the weights were seen finite
        self.norm: torch.Tensor | None = torch.zeros(())
        self.last_loss: torch.Tensor | None = None  # the latest micro-batch's
        self.steps: Steps | None = None  # the epoch in progress, in whole steps

    def _train_step(self, model, forward: Forward) -> TrainStep:
        """The optimizer step, compiled if asked, with what it times and measures at log steps."""
        cfg, dist, tc, device = self.cfg, self.dist, self.cfg.train, self.dist.device
        self.rank_time = observe.RankTime(device) if dist.env.world_size > 1 else observe.Untimed()
        self.stragglers = observe.Stragglers()
        layer_norms = None
        if tc.log_grad_norms:  # per layer, at log steps; under fsdp one all-reduce makes the shards' norms whole
            layer_norms = functools.partial(grad_norms.layer_norms, grad_norms.layers(self.module),
                                            dist if self.strategy.sharded else None)
        # FLOPs per optimizer step: a forward counted in the pre-flight check, times 3 (the backward is two)
        self.flops_per_sample, self.peak_flops = 3 * forward.flops_per_sample, observe.peak_flops(device, tc.peak_flops)
        self.profile = observe.Profile(tc.profile, tc.profile_ranks, dist.env.rank, cfg.run_dir, self.total_steps)
        observe.start_memory_history(device, tc.memory_snapshot)
        return TrainStep(torch.compile(model, backend=tc.compile_backend) if tc.compile else model,
                         self.module, forward, self.optimizer, self.scheduler, self.precision, tc,
                         cfg.optim.l1, self.strategy.no_sync(), self.rank_time, layer_norms, dist)

    def _resume(self) -> None:
        """The run's state, as one registry of checkpoint parts; loaded from the checkpoint to resume from, if
        any; then the loggers (rank 0's), unless the run had ended already (`done`, its summary)."""
        cfg, dist, device, task = self.cfg, self.dist, self.dist.device, self.task
        self.state = RunState(
            shared={**self.strategy.state_parts(self.module, self.optimizer), "scheduler": self.scheduler,
                    "precision": self.precision, "early_stop": self.stopper, "progress": self.progress},
            per_rank={"rng": RngState(device, self._reseed), "running": self.sums,
                      **self.strategy.per_rank_parts(), **({"stream": self.data.position} if self.data.stream else {})},
            dist=dist)
        self.ckpt_dir = cfg.run_dir / "checkpoints"
        self.val_every = cfg.val.every_steps if task.val is not None else None  # val.every_steps, where there is a val set
        self.resumed_from = resume_path(cfg, dist)
        tracking = saving.resume(self) if self.resumed_from is not None else None
        # resumed at the end of a run that completed: its summary (its last checkpoint may precede its end)
        self.done = results.finished_summary(dist, cfg.run_dir, self.progress.step) \
            if self.resumed_from is not None and self.reached_end() else None
        if self.resumed_from is not None and self.done is None and dist.env.is_main:
            saving.say_resumed(self)
        self.log = run_loggers(cfg, tracking, self.progress.records, self.total_steps, self.progress.step) \
            if dist.env.is_main and self.done is None else NullLogger()  # rank 0's, and nothing to rewrite when done

    def _reseed(self, rank: int) -> None:
        seed_everything(rank_seed(self.cfg.seed, rank) + self.progress.step)

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
                            p.pass_ended = not self.data.stream and p.step_in_epoch == self.data.steps_per_epoch
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
            self.log.summary(results.summarize(self, "preempted"))
            self.log.close()
            if self.dist.env.is_main and self.cfg.preempt.requeue:
                from .slurm import requeue_and_log
                requeue_and_log()
            raise
        except BaseException:
            self.preemption.close(wait=False)
            self.log.close(failed=True)  # flush what the trackers hold: a crash must not lose the logged history
            raise
        return results.finish(self)

    def train_epoch(self, epoch: int, before_micro_step: Callable | None) -> None:
        """The optimizer steps of one epoch (the rest of it, when resumed mid-epoch)."""
        p, k = self.progress, self.cfg.train.grad_accum_steps
        if epoch != p.epoch:
            p.epoch, p.step_in_epoch, p.pass_ended = epoch, 0, False
        p.epoch_complete = False  # also where a longer run continues the epoch in which max_steps had ended it
        resumed_mid_pass = p.step_in_epoch > 0
        left = None if self.total_steps is None else self.total_steps - p.step
        self.steps = self.data.epoch(epoch, p.step_in_epoch, left, self.rates)
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
                if self.data.stream and p.step_in_epoch == 0 and not resumed_mid_pass:
                    raise task_mod.TaskError(
                        f"the training stream gave no whole step in pass {epoch}: each rank needs {k} x "
                        f"{self.data.loader.batch_size} samples per step (data.batch_size={self.cfg.data.batch_size} "
                        f"over {self.dist.env.world_size} ranks and train.grad_accum_steps={k})")
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
            nonfinite.skipped(self)
        if log_now:
            train_event.log_train(self, epoch)
        done = self.total_steps is not None and step >= self.total_steps
        if self.val_every and step % self.val_every == 0 and not done:
            self.validate_mid_epoch(epoch)
        preempted = self.preemption.poll()
        every = self.cfg.checkpoint.every_steps
        if preempted or (every and step % every == 0 and not self.epoch_save_follows(epoch, done)):
            saving.save_checkpoint(self)
        if preempted:
            saving.collectively(self.dist, self.strategy.wait)  # the checkpoint must be whole before the process ends
            raise Preempted(f"{self.preemption.signal_name}: checkpoint written at step {p.step}")
        return done or p.stopped_early

    def validate_mid_epoch(self, epoch: int) -> None:
        """val.every_steps: validate within the epoch; its time counts neither as training nor in the next log."""
        started = time.perf_counter()
        self.validate(epoch)
        self.phase = "training"
        self.rates.pause(time.perf_counter() - started, in_epoch=True)

    def end_epoch(self, epoch: int) -> None:
        """After an epoch's steps: the finite check, validation, early stopping, the epoch checkpoint."""
        p, cfg, started = self.progress, self.cfg, time.perf_counter()
        if cfg.train.nonfinite == "stop" and self.finite_at != p.step:  # validation would hide it
            count = nonfinite_count(self.step.params).double().reshape(1)
            nonfinite.check_finite(self, self.dist.all_reduce_sum(count)[0] == 0)
        validated = p.last_val is not None and p.val_step == p.step  # by val.every_steps, or before a preemption
        if self.task.val is not None and ((epoch + 1) % cfg.val.every == 0 or self.last_epoch(epoch)) and not validated:
            self.validate(epoch)
        p.epoch_complete = True
        if self.saves_at_epoch_end(epoch):
            self.phase = "checkpointing"
            saving.save_checkpoint(self)
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
        if cfg.checkpoint.save_best and improved:
            saving.save_best(self, epoch)
