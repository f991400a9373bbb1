"""`ddptrain sweep`: hyperparameter search with Optuna, each trial a full (optionally distributed) run.

The sweep process never trains: every trial is a `ddptrain train` (or `ddptrain launch` with P
processes) subprocess with its own run directory. The sweep follows the trial's metrics.jsonl, reports
each validation to Optuna, and stops the trial with SIGTERM when the pruner says so. All state lives
in the Optuna storage (SQLite in the sweep directory by default), so a stopped sweep continues where it
was, and many workers on many machines can share one study through a database URL.
"""
from __future__ import annotations

import csv
import difflib
import json
import math
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import config as config_mod
from .config import Config, ConfigError

SAMPLERS = ("grid", "random", "tpe", "gp")
PRUNERS = ("median", "successive_halving", "none")


class TrialFailed(Exception):
    """A trial's run exited with an error; Optuna records the trial as failed and the sweep goes on."""


@dataclass
class Param:
    key: str
    kind: str  # float | int | choice | fixed
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list = field(default_factory=list)
    value: object = None

    @property
    def encoded(self) -> bool:
        """Optuna's categorical values must be scalars: lists (layer widths...) go through JSON strings."""
        return self.kind == "choice" and not all(isinstance(c, (str, int, float, bool, type(None))) for c in self.choices)

    def decode(self, value):
        return json.loads(value) if self.encoded else value

    def suggest(self, trial):
        if self.kind == "fixed":
            return self.value
        if self.encoded:
            return self.decode(trial.suggest_categorical(self.key, [json.dumps(c) for c in self.choices]))
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def samples(self) -> list:
        """Values that must all be valid config values: the ends of a range, every choice."""
        if self.kind == "fixed":
            return [self.value]
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]


@dataclass
class Space:
    objective: str
    direction: str
    params: list[Param]
    pruner: dict


def _param(key: str, spec) -> Param:
    where = f"search space key '{key}'"
    if not isinstance(spec, dict):
        return Param(key, "fixed", value=spec)
    unknown = set(spec) - {"type", "low", "high", "log", "choices"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; expected type/low/high/log or choices")
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise ConfigError(f"{where}: choices must be a non-empty list, got {spec['choices']!r}")
        return Param(key, "choice", choices=spec["choices"])
    kind = spec.get("type", "float")
    if kind not in ("float", "int"):
        raise ConfigError(f"{where}: type must be float or int, got {kind!r}")
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: a range needs numeric low and high, got {spec!r}") from None
    if not low < high:
        raise ConfigError(f"{where}: empty or inverted range [{spec['low']}, {spec['high']}]: expected low < high")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range must be above 0, got [{spec['low']}, {spec['high']}]")
    return Param(key, kind, low=low, high=high, log=log)


def load_space(path: Path, base: dict) -> Space:
    """Read and check the space file against the base config (as plain data): errors before any trial."""
    data = config_mod.read_file(path)
    known_top = {"objective", "direction", "params", "pruner"}
    for key in data:
        if key not in known_top:
            raise ConfigError(f"search space '{path}': unknown key '{key}'; expected {', '.join(sorted(known_top))}")
    objective = data.get("objective")
    if not isinstance(objective, str) or not objective.startswith("val_"):
        raise ConfigError(f"search space '{path}': objective must name a validation metric val_<name>, got {objective!r}")
    direction = data.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"search space '{path}': direction must be maximize or minimize, got {direction!r}")
    if not isinstance(data.get("params"), dict) or not data["params"]:
        raise ConfigError(f"search space '{path}': params must map config keys to ranges, choices or values")
    keys = [k for k, _, _ in config_mod.describe()]
    params = []
    for key, spec in data["params"].items():
        if key not in keys and not key.startswith("task_args."):
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"search space '{path}': unknown config key '{key}'{hint}")
        p = _param(key, spec)
        for value in p.samples():  # every end and choice must be a valid value of that key
            config_mod.from_dict(config_mod.apply_overrides(base, [f"{key}={json.dumps(value)}"]))
        params.append(p)
    pruner = data.get("pruner") or {"name": "median"}
    if pruner.get("name") not in PRUNERS:
        raise ConfigError(f"search space '{path}': pruner.name must be one of {', '.join(PRUNERS)}, got {pruner.get('name')!r}")
    return Space(objective, direction, params, pruner)


def check_objective(cfg: Config, objective: str) -> None:
    """The objective must be a metric the task reports, or the runs would never report it."""
    from .task import build, resolve
    task = build(cfg, resolve(cfg.task))
    known = ["val_loss"] + [f"val_{name}" for name in task.metrics]
    if task.val is None:
        raise ConfigError(f"task '{cfg.task}' has no validation set: a sweep needs one for its objective")
    if objective not in known:
        close = difflib.get_close_matches(objective, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; the runs report {', '.join(known)}"
        raise ConfigError(f"search space: objective '{objective}' is never reported{hint}")


def _sampler(name: str, space: Space, seed: int):
    import optuna
    if name == "grid":
        ranges = [p.key for p in space.params if p.kind in ("float", "int")]
        if ranges:
            raise ConfigError(f"--sampler grid needs choices, not ranges, for: {', '.join(ranges)}")
        grid = {p.key: [json.dumps(c) for c in p.choices] if p.encoded else p.choices
                for p in space.params if p.kind == "choice"}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.GPSampler(seed=seed)


def _pruner(spec: dict):
    import optuna
    name = spec.get("name", "median")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    try:
        if name == "median":
            return optuna.pruners.MedianPruner(**kwargs)
        if name == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(**kwargs)
        return optuna.pruners.NopPruner()
    except TypeError as e:
        raise ConfigError(f"search space: pruner {name}: {e}") from None


def _overrides(params: dict) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in params.items()]


def _val_values(metrics: Path, seen: int, name: str) -> tuple[list[float], int]:
    """New validation values of `name` in a trial's metrics.jsonl past the first `seen` lines."""
    if not metrics.exists():
        return [], seen
    text = metrics.read_text()
    lines = text.splitlines()
    complete = lines if text.endswith("\n") else lines[:-1]  # the last line may still be being written
    values = [json.loads(l).get(name) for l in complete[seen:] if '"split": "val"' in l]
    return [v for v in values if v is not None], len(complete)


class Runner:
    """Runs one trial as a subprocess, reporting validations to Optuna and pruning when asked."""

    def __init__(self, config_path: Path, overrides: list[str], space: Space, sweep_dir: Path, study_name: str,
                 nproc: int):
        self.config_path, self.overrides, self.space = config_path, overrides, space
        self.sweep_dir, self.study_name, self.nproc = sweep_dir, study_name, nproc
        self.running: set[subprocess.Popen] = set()
        self.stopping = False

    def stop(self, signum=None, frame=None) -> None:
        """Stop the sweep: SIGTERM to every running trial (each checkpoints and exits); no new trial starts."""
        self.stopping = True
        for proc in list(self.running):
            proc.send_signal(signal.SIGTERM)

    def __call__(self, trial) -> float:
        import optuna
        if self.stopping:
            trial.study.stop()
            raise TrialFailed("the sweep was stopped before this trial started")
        params = {p.key: p.suggest(trial) for p in self.space.params}
        name = f"trial-{trial.number:04d}"
        run_dir = self.sweep_dir / name
        log_path = self.sweep_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("log", str(log_path))
        launcher = ["train"] if self.nproc == 1 else ["launch", "--nproc-per-node", str(self.nproc)]
        cmd = [sys.executable, "-m", "ddptrain", *launcher, str(self.config_path), *self.overrides,
               *_overrides(params), f"runs_dir={self.sweep_dir}", f"name={name}", "checkpoint.resume=none",
               f"wandb.group={self.study_name}", "preempt.requeue=false"]
        metric = self.space.objective[4:]
        best, seen, epoch = None, 0, 0
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.running.add(proc)
            pruned = False
            while True:
                done = proc.poll() is not None
                values, seen = _val_values(run_dir / "metrics.jsonl", seen, metric)
                for value in values:
                    best = value if best is None else (max if self.space.direction == "maximize" else min)(best, value)
                    trial.report(value, epoch)
                    epoch += 1
                    if not pruned and trial.should_prune():
                        pruned = True
                        proc.send_signal(signal.SIGTERM)  # the run checkpoints and stops cleanly
                if done:
                    break
                time.sleep(0.2)
        self.running.discard(proc)
        if self.stopping:
            trial.study.stop()
            raise TrialFailed(f"trial {trial.number} was stopped with the sweep; see {log_path}")
        if pruned:
            raise optuna.TrialPruned(f"pruned after {epoch} validations")
        if proc.returncode != 0:
            raise TrialFailed(f"trial {trial.number} exited with status {proc.returncode}; see {log_path}")
        if best is None or not math.isfinite(best):
            raise TrialFailed(f"trial {trial.number} reported no finite {self.space.objective}; see {log_path}")
        return best


def run_sweep(config_path: Path, space_path: Path, overrides: list[str], sampler: str, trials: int, workers: int,
              nproc: int, storage: str | None, study_name: str | None, seed: int) -> dict:
    base = config_mod.apply_overrides(config_mod.read_file(config_path), list(overrides))
    base.setdefault("name", Path(config_path).stem)
    cfg = config_mod.from_dict(base)
    space = load_space(space_path, base)
    check_objective(cfg, space.objective)
    study_name = study_name or f"{cfg.name}-sweep"
    sweep_dir = Path(cfg.runs_dir) / study_name
    sweep_dir.mkdir(parents=True, exist_ok=True)

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    # A worker that dies leaves its trial RUNNING; the heartbeat marks it failed and a worker retries it.
    # SQLite serialises writers: wait for the lock instead of failing when several workers share the file.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(5):  # workers that start together race to create the tables and the study
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=2, grace_period=10,
                                 heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
            study = optuna.create_study(study_name=study_name, storage=rdb, load_if_exists=True,
                                        direction=space.direction, pruner=_pruner(space.pruner))
            break
        except Exception:
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
    # A continued study must not replay the random draws of its first session: offset the seed.
    study.sampler = _sampler(sampler, space, seed + len(study.trials))
    # The budget counts trials that ran to a verdict; failed ones (crashed, interrupted) are recorded
    # with their log but do not use it up.
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = trials - sum(t.state in finished for t in study.trials)
    runner = Runner(Path(config_path).resolve(), list(overrides), space, sweep_dir.resolve(), study_name, nproc)
    previous = {sig: signal.signal(sig, runner.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if remaining > 0:
            # n_trials bounds this process; MaxTrialsCallback stops it early when other workers on the
            # same storage have already brought the study to its budget.
            study.optimize(runner, n_trials=remaining, n_jobs=workers, catch=(TrialFailed,),
                           callbacks=[optuna.study.MaxTrialsCallback(trials, states=finished)])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    result = report(study, space, cfg, base, sweep_dir)
    result["stopped"] = runner.stopping
    return result


def report(study, space: Space, cfg: Config, base: dict, sweep_dir: Path) -> dict:
    """Write the trial table, the best config and the plots; print the table; return the best trial's facts."""
    import optuna
    rows = []
    for t in study.trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({"trial": t.number, "state": t.state.name, space.objective: t.value,
                     "seconds": round(seconds, 1) if seconds is not None else None,
                     **{k: v if isinstance(v, str) and v[:1] == "[" else json.dumps(v) for k, v in t.params.items()},
                     "log": t.user_attrs.get("log")})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(sweep_dir / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    shown = [k for k in keys if k != "log"]
    print(" | ".join(shown))
    for r in rows:
        print(" | ".join("" if r.get(k) is None else str(r.get(k)) for k in shown))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ConfigError(f"sweep '{study.study_name}': no trial completed; see the logs in {sweep_dir}")
    best = study.best_trial
    by_key = {p.key: p for p in space.params}
    best_params = {k: by_key[k].decode(v) for k, v in best.params.items()}
    fixed = {p.key: p.value for p in space.params if p.kind == "fixed"}
    best_cfg = config_mod.from_dict(config_mod.apply_overrides(
        base, _overrides({**fixed, **best_params}) + [f"name={cfg.name}-best"]))
    (sweep_dir / "best_config.yaml").write_text(config_mod.dump_yaml(best_cfg))
    (sweep_dir / "best.json").write_text(json.dumps(
        {"trial": best.number, "value": best.value, "params": best_params, "objective": space.objective}, indent=2))
    _plots(study, sweep_dir, len(complete))
    print(f"best: trial {best.number}, {space.objective} {best.value:.6g}, params {best_params}")
    print(f"wrote {sweep_dir / 'trials.csv'}, {sweep_dir / 'best_config.yaml'} and plots in {sweep_dir}")
    return {"best_trial": best.number, "best_value": best.value, "best_params": best_params,
            "sweep_dir": str(sweep_dir), "trials": rows}


def _plots(study, sweep_dir: Path, n_complete: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        ax = ovm.plot_optimization_history(study)
        ax.figure.savefig(sweep_dir / "history.png", dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
        if n_complete >= 2 and len(study.best_trial.params) >= 1:
            ax = ovm.plot_param_importances(study)
            ax.figure.savefig(sweep_dir / "importance.png", dpi=100, bbox_inches="tight")
            plt.close(ax.figure)
