"""The results of a sweep: the trial table (printed and trials.csv), the best trial's config and the plots.

Written by every worker when it ends, from the whole study, so the files describe all workers' trials.
"""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

from . import configfile
from .config import Config
from .space import Space, as_overrides


def _params(t) -> dict:
    """A trial's parameters; a waiting one's (queued again) are those it will take."""
    return t.params or t.system_attrs.get("fixed_params", {})


def _row(t, space: Space) -> dict:
    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
    run_dir = t.user_attrs.get("run_dir")
    return {"trial": t.number, "state": t.state.name, space.objective: t.value,
            "seconds": round(seconds, 1) if seconds is not None else None,
            **{k: v if isinstance(v, str) and v[:1] == "[" else json.dumps(v) for k, v in _params(t).items()},
            "worker": t.user_attrs.get("worker"), "run": Path(run_dir).name if run_dir else None,
            "note": t.user_attrs.get("note"), "log": t.user_attrs.get("log")}


def _cell(value, param: bool) -> str:
    """A cell of the printed table: a parameter's string choice plain, like the numbers beside it (trials.csv
    keeps parameters as JSON, so that they read back with their types)."""
    if value is None:
        return ""
    decoded = json.loads(value) if param else value
    return decoded if isinstance(decoded, str) else str(value)


def report(study, space: Space, cfg: Config, base: dict, sweep_dir: Path) -> dict | None:
    """Write and print the trial table; with a completed trial, also the best config and the plots, and
    return the best trial's facts (None without one)."""
    import optuna
    rows = [_row(t, space) for t in study.trials]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(sweep_dir / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    shown, params = [k for k in keys if k != "log"], {k for t in study.trials for k in _params(t)}
    print(" | ".join(shown))
    for r in rows:
        print(" | ".join(_cell(r.get(k), k in params) for k in shown))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return None
    best = study.best_trial
    by_key = {p.key: p for p in space.params}
    best_params = {k: by_key[k].decode(v) for k, v in best.params.items()}
    fixed = {p.key: p.value for p in space.params if p.kind == "fixed"}
    best_cfg = configfile.from_dict(configfile.apply_overrides(
        base, as_overrides({**fixed, **best_params}) + [f"name={cfg.name}-best"]))
    (sweep_dir / "best_config.yaml").write_text(configfile.dump_yaml(best_cfg))
    (sweep_dir / "best.json").write_text(json.dumps(
        {"trial": best.number, "value": best.value, "params": best_params, "objective": space.objective}, indent=2))
    _plots(study, sweep_dir, len(complete))
    shown_params = " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in best_params.items())
    print(f"best: trial {best.number}, {space.objective} {best.value:.6g}, params {shown_params}")  # as overrides
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
