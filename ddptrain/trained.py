"""Using a trained run: its model with the trained weights (`load_model`), and evaluation without training
(`evaluate`, the `ddptrain eval` command), with the same numbers for any world size.

A run is named by its directory (which holds the resolved `config.yaml`) or by its config file. The task
is built from that config, so its module must be importable from where this runs, as it was for training.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from torch import nn

from . import checkpoint as ckpt
from . import config as config_mod
from . import configfile
from . import task as task_mod
from .config import Config, ConfigError
from .dist import Dist, detect, in_callers_group
from .runlog import warn
from .sharded import load_sharded
from .state import callers_rng, pinned_diffs, seed_everything, shown_value


def run_config(run: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """The config of a run directory (its config.yaml, the directory itself as the run) or of a config file."""
    path = Path(run)
    if not path.exists():
        raise ConfigError(f"'{path}': not found; expected a run directory or a config file")
    if not path.is_dir():
        return configfile.load(path, overrides)
    saved = path / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"'{path}': not a run directory (it has no config.yaml)")
    if path.name in ("", ".."):  # `.` or `..`: the run is named by the directory's own name
        path = path.resolve()
    data = {**configfile.read_file(saved), "runs_dir": str(path.parent), "name": path.name}
    return configfile.build(data, saved, overrides)


def _tested(cfg: Config) -> str | None:
    """The weights the run's own test used, best or last, as its summary.json says (None before it ended)."""
    import json
    try:
        summary = json.loads((cfg.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary.get("tested_weights") if summary.get("status") == "completed" else None


def checkpoint_path(cfg: Config, which: str = "auto") -> Path:
    """best, last (the newest whole step checkpoint), auto (those the run's own test used, so that the numbers
    are the run's: best or last; before the run ended, best if whole, else last) or a file's path."""
    directory = cfg.run_dir / "checkpoints"
    if which not in ("auto", "best", "last"):
        if not Path(which).exists():
            raise ckpt.CheckpointError(f"checkpoint '{which}': not found; expected auto, best, last or a "
                                       f"checkpoint's path")
        return Path(which)
    tested = _tested(cfg) if which == "auto" else None
    if tested == "last":
        which = "last"
    if which in ("auto", "best"):
        best = ckpt.best_path(cfg.run_dir, cfg.dist.strategy)
        problem = ckpt.verify(best)
        if problem is None:
            return best
        if which == "best":
            raise ckpt.CheckpointError(f"checkpoint '{best}': {problem}; `last` (--checkpoint last) takes the "
                                       f"newest step checkpoint")
        if tested == "best":
            warn(f"checkpoint '{best}': {problem}; the run tested it, so the newest step checkpoint's numbers are "
                 f"not the run's")
    last = ckpt.latest_valid(directory)
    if last is None:
        raise ckpt.CheckpointError(f"'{directory}': no whole checkpoint")
    return last


def _real_model(task: task_mod.Task, cfg: Config) -> nn.Module:
    """The task's model, given storage and initial values where it was built on the meta device (buffers
    that no checkpoint holds need them)."""
    from .models import materialize, on_meta
    if on_meta(task.model):
        materialize(task.model, task.init, cfg.seed)
    return task.model


def _check_as_trained(state: dict, path: Path, run: str | os.PathLike, written: Config, model_keys_matter: bool,
                      hint: str = "") -> None:
    """Refuse a run's config file (`written`, as read, without overrides) that was edited after training in what
    shapes the model or its data (the keys a resume pins), against the config that checkpoint `path` holds, the
    one it was trained with. A checkpoint without one (best.pt from before it held it) leaves the file as it is."""
    if "config" not in state:
        return
    import yaml
    trained = yaml.safe_load(yaml.safe_dump(state["config"]))  # as config.yaml would hold it: a tuple is a list there
    diffs = pinned_diffs(trained, config_mod.to_dict(written), model_keys_matter)
    if not diffs:
        return
    shown = "; ".join(f"config key '{k}' is {shown_value(now)} in the file, {shown_value(then)} in the checkpoint"
                      for k, then, now in diffs)
    fix = "put back the values it was trained with"
    if Path(run).is_dir():
        file = Path(run) / "config.yaml"
    else:  # most often the config of the next experiment by now; the run directory keeps the run's own
        file, fix = Path(run), f"name the run directory '{written.run_dir}' instead, {fix}"
    raise ConfigError(f"'{file}' no longer matches the config checkpoint '{path}' was trained with: {shown}; "
                      f"{fix}{hint}")


def _load_weights(model: nn.Module, path: Path, check: Callable[[dict], None]) -> int | None:
    """Load a checkpoint's weights (best.pt or a step checkpoint, a file or a directory of shards) into `model`,
    once `check` has seen the rest of the checkpoint; return its step."""
    state = ckpt.load(path)
    check(state)
    if path.is_dir():  # FSDP's shards, put together into the whole tensors of this process's model
        weights = {"model": model.state_dict()}
        load_sharded(path, weights, no_dist=True)
        state = {**state, "model": weights["model"]}
    if "model" not in state:
        raise ckpt.CheckpointError(f"checkpoint '{path}': it holds no model weights")
    ckpt.load_model_state(model, state, path)
    return state.get("step", (state.get("progress") or {}).get("step"))


@callers_rng()
def load_model(run: str | os.PathLike, which: str = "best", task: Callable | None = None) -> nn.Module:
    """The run's model with its trained weights (best, last or a checkpoint's path), on CPU, in eval mode."""
    cfg = run_config(run)
    seed_everything(cfg.seed)
    built = task_mod.build(cfg, task or task_mod.resolve(cfg.task))
    model = _real_model(built, cfg)
    path = checkpoint_path(cfg, which)
    _load_weights(model, path, lambda state: _check_as_trained(state, path, run, cfg, built.reads_model_config))
    return model.cpu().eval()


def _check_same_split(cfg: Config, written: Config, split: str) -> None:
    """The overrides keep the run's split: another would hold some of its training samples."""
    for key in ("val_fraction", "test_fraction", "split_seed"):
        if getattr(cfg.data, key) != getattr(written.data, key):
            raise ConfigError(f"config key 'data.{key}': the run was trained with {getattr(written.data, key)!r}, "
                              f"and its {split} set is split with it; another value would evaluate on other "
                              f"samples, some of them trained on")


def _chosen_checkpoint(cfg: Config, dist: Dist, checkpoint: str) -> str:
    """The checkpoint's path, picked by rank 0, so that a run still writing one cannot make the ranks disagree.
    Call on all ranks."""
    found, error = None, None
    if dist.env.is_main:
        try:
            found = str(checkpoint_path(cfg, checkpoint))
        except ckpt.CheckpointError as e:
            error = str(e)
    found, error = dist.broadcast_object((found, error))
    if error:
        raise ckpt.CheckpointError(error)
    return found


@callers_rng()
def evaluate(run: str | os.PathLike, checkpoint: str = "auto", split: str = "test", overrides: list[str] = (),
             task: Callable | None = None) -> dict:
    """Evaluate a trained run on its val or test set: {'split', 'checkpoint', 'step', 'loss', <metrics>}.

    Works in one process or on every rank under torchrun/srun (call on all ranks), also in a process group
    that the calling program made (which it keeps); the numbers are the same for any world size (sharded
    evaluation of sums, see evaluation.py).
    """
    from .evaluation import Evaluator
    from .precision import Precision
    from .preflight import prepare

    if split not in ("val", "test"):
        raise ConfigError(f"--split: expected val or test, got {split!r}")
    cfg = run_config(run, overrides)
    written = run_config(run) if overrides else cfg  # the file alone: the checkpoint's config is checked against it
    if overrides and Path(run).is_dir():  # another split would hold some of the run's training samples
        _check_same_split(cfg, written, split)
    env = in_callers_group(detect(os.environ))
    device, backend, built, forward, metrics = prepare(cfg, env, task)
    dataset = getattr(built, split)
    if dataset is None:
        raise ConfigError(f"task '{cfg.task}' has no {split} set")
    dist = Dist(env, device, backend, cfg.dist.init_timeout_s, cfg.val.rank0_timeout_s)
    try:
        found = _chosen_checkpoint(cfg, dist, checkpoint)
        module = _real_model(built, cfg)
        # every rank reads the same files, so every rank refuses an edited config.yaml alike
        step = _load_weights(module, Path(found), lambda state: _check_as_trained(
            state, Path(found), run, written, built.reads_model_config,
            ", then give a change as an override (key=value) to evaluate under it on purpose"))
        module = module.to(device)
        values = Evaluator(dist, forward, metrics, Precision(cfg.train.precision, device), cfg.val.mode, cfg.data,
                           built.collate)(module, dataset)
        return {"split": split, "checkpoint": found, "step": step, **values}
    finally:
        dist.close()
