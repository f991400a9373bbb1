"""The search-space file of `ddptrain sweep`: objective, direction, parameters (ranges, choices, fixed
values) and pruner, checked against the base config and the task before any trial starts.
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import config as config_mod
from . import configfile
from .config import Config, ConfigError

PRUNERS = ("median", "successive_halving", "none")


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
        if self.kind == "int":  # what suggest() gives
            return [int(self.low), int(self.high)]
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]


@dataclass
class Space:
    objective: str
    direction: str | None  # None: left out, for an objective whose direction cannot be known
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
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{where}: a range needs finite low and high, got [{spec['low']}, {spec['high']}]")
    if not low < high:
        raise ConfigError(f"{where}: empty or inverted range [{spec['low']}, {spec['high']}]: expected low < high")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range must be above 0, got [{spec['low']}, {spec['high']}]")
    return Param(key, kind, low=low, high=high, log=log)


def _direction_of(objective: str, base: dict) -> str | None:
    """The direction a search space leaves out: a loss is minimized; the base config's monitored metric goes
    its early_stop.mode's way; of any other, nothing can be known."""
    if objective.endswith("loss"):
        return "minimize"
    early_stop = base.get("early_stop") or {}
    if objective == early_stop.get("monitor", "val_loss"):
        return {"min": "minimize", "max": "maximize"}.get(early_stop.get("mode", "min"))
    return None


def _checked_param(key: str, spec, keys: list[str], base: dict) -> Param:
    """The Param of params.<key>, each of its ends and choices checked as a value of that config key."""
    if key not in keys and not key.startswith("task_args."):
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config key '{key}'{hint}")
    p = _param(key, spec)
    for value in p.samples():
        configfile.from_dict(configfile.apply_overrides(base, as_overrides({key: value})))
    return p


def load_space(path: Path, base: dict) -> Space:
    """Read and check the space file against the base config (as plain data): errors before any trial."""
    data = configfile.read_file(path, "search space file")
    known_top = {"objective", "direction", "params", "pruner"}
    for key in data:
        if key not in known_top:
            raise ConfigError(f"search space '{path}': unknown key '{key}'; expected {', '.join(sorted(known_top))}")
    objective = data.get("objective")
    if not isinstance(objective, str) or not objective.startswith("val_"):
        raise ConfigError(f"search space '{path}': objective must name a validation metric val_<name>, got {objective!r}")
    direction = data.get("direction", _direction_of(objective, base))  # None: asked once the objective is known
    if direction not in ("maximize", "minimize", None):
        raise ConfigError(f"search space '{path}': direction must be maximize or minimize, got {direction!r}")
    if not isinstance(data.get("params"), dict) or not data["params"]:
        raise ConfigError(f"search space '{path}': params must map config keys to ranges, choices or values")
    keys = [k for k, _, _ in config_mod.describe()]
    params = []
    for key, spec in data["params"].items():
        try:
            params.append(_checked_param(key, spec, keys, base))
        except ConfigError as e:
            line = configfile.key_line(path, ["params", key])
            raise ConfigError(f"{path}:{line}: {e}" if line else f"search space '{path}': {e}") from None
    pruner = data.get("pruner") or {"name": "median"}
    if not isinstance(pruner, dict):
        raise ConfigError(f"search space '{path}': pruner must be a mapping such as {{name: median}}, got {pruner!r}")
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


def as_overrides(params: dict) -> list[str]:
    """Config overrides (`key=value`, values as JSON) that set these parameters."""
    return [f"{key}={json.dumps(value)}" for key, value in params.items()]
