"""`ddptrain sweep`: hyperparameter search with Optuna, each trial a full (optionally distributed) run.

The sweep process never trains: every trial is a `ddptrain train` (or `ddptrain launch` with P
processes) subprocess with its own run directory. The sweep follows the trial's metrics.jsonl, reports
each validation to Optuna, and stops the trial with SIGTERM when the pruner says so. All state lives
in the Optuna storage (SQLite in the sweep directory by default), so a stopped sweep continues where it
was, many workers on many machines can share one study through a database URL, and a trial stopped
with its worker is queued again to continue from its checkpoint on whichever worker takes it next.
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

from . import configfile
from . import study as studies
from .config import Config, ConfigError
from .runlog import read_event
from .space import Space, as_overrides, check_objective, load_space
from .sweep_report import report

SAMPLERS = ("grid", "random", "tpe", "gp")
# A worker that gets one of these is being preempted (SLURM's time limit, a preemption): it stops, queues
# its trials again, requeues its SLURM job and exits 75. SIGINT (Ctrl-C) stops it the same way, exit 130.
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class TrialFailed(Exception):
    """A trial's run failed, was stopped or did not start; Optuna records it as failed and the sweep goes on."""


def prepare(config_path: Path, space_path: Path, overrides: list[str], sampler: str) -> tuple[dict, Config, Space]:
    """Read and check the base config, the search space and the sampler; every mistake fails here, before
    any trial (and, for `ddptrain submit --sweep`, before the job waits in the queue)."""
    try:
        import optuna  # noqa: F401
    except ModuleNotFoundError:
        raise ConfigError("ddptrain sweep needs optuna: pip install 'ddptrain[sweep]'") from None
    data = configfile.read_file(config_path)
    data.setdefault("name", Path(config_path).stem)
    cfg = configfile.build(data, config_path, overrides)
    base = configfile.apply_overrides(data, list(overrides))
    space = load_space(Path(space_path), base)
    check_objective(cfg, space.objective)
    if space.direction is None:
        raise ConfigError(f"search space '{space_path}': direction: maximize or minimize {space.objective}? (a loss "
                          f"is minimized, the monitored metric follows early_stop.mode; others must say)")
    studies.sampler(sampler, space, 0)
    studies.pruner(space.pruner)
    return base, cfg, space


def _val_values(metrics: Path, seen: int, name: str) -> tuple[list[float], int]:
    """New validation values of `name` in a trial's metrics.jsonl past the first `seen` lines."""
    if not metrics.exists():
        return [], seen
    text = metrics.read_text()
    lines = text.splitlines()
    complete = lines if text.endswith("\n") else lines[:-1]  # the last line may still be being written
    values = [read_event(l).get(name) for l in complete[seen:] if '"split": "val"' in l]
    return [v for v in values if v is not None], len(complete)


def worker_name(env=os.environ) -> str:
    """Who runs a trial, for the trial table: the SLURM job (or array task) and node, else host and process."""
    from .slurm import job_to_requeue
    job, host = job_to_requeue(env), env.get("SLURMD_NODENAME") or socket.gethostname()
    return f"{job}@{host}" if job else f"{host}:{os.getpid()}"


def _session_seed(seed: int, n_trials: int, env=os.environ) -> int:
    """The sampler's seed for this session: a continued study must not replay the draws of its first
    session, and the tasks of a job array, started together with the same --seed, must not draw alike."""
    return random.Random(f"{seed}/{n_trials}/{env.get('SLURM_ARRAY_TASK_ID', '')}").randrange(2**31)


def taken(study, below: int | None = None) -> int:
    """Trials that use up the budget of --trials: finished and running ones. With `below`, the number of a
    trial about to start, only those numbered below it, and queued ones too: those will run before it, and
    numbers order the trials that two workers start at the same moment."""
    import optuna
    if below is None:  # a dead worker's trial must not hold its place: fail it (a worker retries it)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    S = optuna.trial.TrialState
    states = (S.COMPLETE, S.PRUNED, S.RUNNING) + ((S.WAITING,) if below is not None else ())
    return sum(below is None or t.number < below for t in study.get_trials(deepcopy=False, states=states))


def _point_taken(trial, params: dict) -> bool:
    """Another trial of the study, finished or running, has these parameters."""
    import optuna
    S = optuna.trial.TrialState
    return any(t.params == params for t in trial.study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.RUNNING))
               if t.number != trial.number)


def _queue_again(trial, run_dir: Path | None) -> None:
    """Queue a stopped trial's parameters again; the trial that takes them continues `run_dir` from its checkpoint."""
    import optuna
    S = optuna.trial.TrialState
    (frozen,) = [t for t in trial.study.get_trials(deepcopy=False, states=(S.RUNNING,)) if t.number == trial.number]
    # study.enqueue_trial, plus the grid point: the grid sampler looks it up on every trial that ends.
    grid = {k: frozen.system_attrs[k] for k in ("grid_id", "search_space") if k in frozen.system_attrs}
    trial.study.add_trial(optuna.trial.create_trial(
        state=S.WAITING, system_attrs={"fixed_params": trial.params, **grid},
        user_attrs={"resume_run_dir": str(run_dir)} if run_dir else None))


def _failed(trial, note: str) -> TrialFailed:
    trial.set_user_attr("note", note)
    return TrialFailed(f"trial {trial.number} {note}")


class Runner:
    """Runs one trial as a subprocess, reporting validations to Optuna and pruning when asked."""

    def __init__(self, config_path: Path, overrides: list[str], space: Space, sweep_dir: Path, study_name: str,
                 nproc: int, budget: int, grid: bool = False):
        self.config_path, self.overrides, self.space, self.grid = config_path, overrides, space, grid
        self.sweep_dir, self.study_name, self.nproc, self.budget = sweep_dir, study_name, nproc, budget
        self.worker = worker_name()
        self.running: set[subprocess.Popen] = set()
        self.stopped_by: str | None = None

    def stop(self, signum, frame=None) -> None:
        """Signal handler: SIGTERM to every running trial (each checkpoints and exits); no new trial starts."""
        self.stopped_by = self.stopped_by or signal.Signals(signum).name
        for proc in list(self.running):
            proc.send_signal(signal.SIGTERM)

    def __call__(self, trial) -> float:
        import optuna
        params = {p.key: p.suggest(trial) for p in self.space.params}
        resume = trial.user_attrs.get("resume_run_dir")
        if self.stopped_by or taken(trial.study, below=trial.number) >= self.budget:
            trial.study.stop()
            if self.stopped_by:
                _queue_again(trial, resume and Path(resume))
                raise _failed(trial, "not run: the sweep was stopping; queued again")
            # another worker took the last place between this worker's check and its new trial
            raise _failed(trial, f"not run: the study already has its {self.budget} trials")
        if self.grid and resume is None and _point_taken(trial, params):
            trial.study.stop()  # Optuna's grid sampler hands out a point again once every point is taken
            raise _failed(trial, "not run: every point of the grid has run or is running")
        run_dir = Path(resume) if resume else self.sweep_dir / f"trial-{trial.number:04d}"
        log_path = self.sweep_dir / "logs" / f"trial-{trial.number:04d}.log"
        for key, value in (("run_dir", str(run_dir)), ("log", str(log_path)), ("worker", self.worker)):
            trial.set_user_attr(key, value)
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        print(f"trial {trial.number} started on {self.worker}: {shown}; run {run_dir}"
              f"{' (continued from its checkpoint)' if resume else ''}, log {log_path}", flush=True)
        returncode, best, pruned_after = self._run(trial, params, run_dir, log_path, resume is not None)
        if self.stopped_by:
            trial.study.stop()
        if pruned_after is not None:
            raise optuna.TrialPruned(f"pruned after {pruned_after} validations")
        if returncode == 0 and best is not None and math.isfinite(best):
            return best  # finished, even if the sweep is stopping: it counts
        if self.stopped_by:
            _queue_again(trial, run_dir)
            raise _failed(trial, f"stopped with the sweep ({self.stopped_by}, exit status {returncode}); "
                                 f"queued again to continue {run_dir.name} from its checkpoint")
        if returncode != 0:
            raise _failed(trial, f"exited with status {returncode}; see {log_path}")
        raise _failed(trial, f"reported no finite {self.space.objective}; see {log_path}")

    def _run(self, trial, params: dict, run_dir: Path, log_path: Path,
             resume: bool) -> tuple[int, float | None, int | None]:
        """Run the trial, reporting its validations: (exit status, best objective value, validations before it was
        pruned or None)."""
        launcher = ["train"] if self.nproc == 1 else ["launch", "--nproc-per-node", str(self.nproc)]
        cmd = [sys.executable, "-m", "ddptrain", *launcher, str(self.config_path), *self.overrides,
               *as_overrides(params), f"runs_dir={run_dir.parent}", f"name={run_dir.name}",
               f"checkpoint.resume={'auto' if resume else 'none'}", f"wandb.group={self.study_name}",
               "preempt.requeue=false"]
        metric, better = self.space.objective[4:], max if self.space.direction == "maximize" else min
        best, seen, step, pruned_after = None, 0, 0, None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.running.add(proc)
            if self.stopped_by:  # the signal came before the trial was in self.running
                proc.send_signal(signal.SIGTERM)
            while True:
                done = proc.poll() is not None
                # A resumed run's metrics.jsonl holds the validations up to its checkpoint (a resume cuts off
                # any later ones): reading it from the start gives the pruner every validation of the run.
                values, seen = _val_values(run_dir / "metrics.jsonl", seen, metric)
                for value in values:
                    if math.isfinite(value):  # a NaN is reported (the pruner prunes on it), never the best
                        best = value if best is None else better(best, value)
                    trial.report(value, step)
                    step += 1
                    if pruned_after is None and trial.should_prune():
                        pruned_after = step
                        proc.send_signal(signal.SIGTERM)  # the run checkpoints and stops cleanly
                if done:
                    break
                time.sleep(0.2)
        self.running.discard(proc)
        return proc.returncode, best, pruned_after

    def after_trial(self, study, trial) -> None:
        """Optuna callback: say how the trial ended; stop once the budget is used up (by any worker)."""
        value = f" {self.space.objective} {trial.value:.6g}" if trial.value is not None else ""
        note = trial.user_attrs.get("note")
        print(f"trial {trial.number} {trial.state.name}{value}{': ' + note if note else ''}", flush=True)
        if taken(study) >= self.budget:
            study.stop()


def _not_a_failed_trial(record: logging.LogRecord) -> bool:
    """Optuna logs every failed trial, with a traceback; the sweep's own line for it says all there is."""
    message = record.getMessage()
    return not (message.startswith("Trial ") and " failed with " in message)


def run_sweep(config_path: Path, space_path: Path, overrides: list[str], sampler: str, trials: int, workers: int,
              nproc: int, storage: str | None, study_name: str | None, seed: int) -> dict:
    """Run trials until the study has `trials` finished ones or a signal stops this worker. Returns the best
    trial's facts (if any completed), `stopped_by` (the signal's name or None) and `requeue` (the config's
    preempt.requeue)."""
    base, cfg, space = prepare(config_path, space_path, overrides, sampler)
    study_name = study_name or f"{cfg.name}-sweep"
    sweep_dir = Path(cfg.runs_dir) / study_name
    if storage is None:  # its database lives there; with another storage the directory waits for the study
        sweep_dir.mkdir(parents=True, exist_ok=True)

    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna.study._optimize").addFilter(_not_a_failed_trial)
    study = studies.open_study(storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}", study_name, space)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study.sampler = studies.sampler(sampler, space, _session_seed(seed, len(study.trials)))
    # The budget counts trials that ran to a verdict; failed ones (crashed, interrupted) are recorded
    # with their log but do not use it up.
    S = optuna.trial.TrialState
    remaining = trials - len(study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED)))
    if sampler == "grid" and study.sampler.is_exhausted(study):  # a finished grid run again: nothing left to run
        remaining = 0
    runner = Runner(Path(config_path).resolve(), list(overrides), space, sweep_dir.resolve(), study_name, nproc,
                    budget=trials, grid=sampler == "grid")
    previous = {sig: signal.signal(sig, runner.stop) for sig in (*PREEMPT_SIGNALS, signal.SIGINT)}
    try:
        if remaining > 0 and taken(study) < trials and not runner.stopped_by:
            # n_trials bounds this process; the callback stops it once the finished and running trials of
            # all workers on the same storage fill the budget.
            study.optimize(runner, n_trials=remaining, n_jobs=workers, catch=(TrialFailed,),
                           callbacks=[runner.after_trial])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    best = report(study, space, cfg, base, sweep_dir)
    if best is None and not runner.stopped_by:
        raise ConfigError(f"sweep '{study_name}': no trial completed; see the logs in {sweep_dir}")
    return {**(best or {}), "stopped_by": runner.stopped_by, "requeue": cfg.preempt.requeue}
