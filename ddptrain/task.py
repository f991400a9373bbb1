"""The user's side of the contract: a task function returns the model, the data, the loss and metrics.

`task: "my_pkg.my_module:build"` (or `path/to/file.py:build`, or a built-in name) names a function
that takes the Config and returns a Task. Before any process group exists, `check` runs the model on
two training samples, so a dataset of the wrong shape fails with a message instead of a deep traceback.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from .config import Config, ConfigError

BUILTIN = {"digits": "ddptrain.tasks.digits:build", "diabetes": "ddptrain.tasks.diabetes:build"}


class TaskError(ValueError):
    """The task or its data does not fit what training needs; a plain user mistake."""


@dataclass
class Task:
    model: nn.Module
    train: Dataset
    val: Dataset | None = None
    test: Dataset | None = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    metrics: dict = field(default_factory=dict)  # name -> per-sample function or Metric object


def resolve(spec: str) -> Callable[[Config], Task]:
    """Import the function named by `module:function`, `file.py:function` or a built-in task name."""
    spec = BUILTIN.get(spec, spec)
    if ":" not in spec:
        raise ConfigError(f"config key 'task': expected a built-in task ({', '.join(BUILTIN)}) or "
                          f"'module:function', got {spec!r}")
    target, name = spec.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            if not Path(target).is_file():
                raise ConfigError(f"config key 'task': file '{target}' not found")
            mod_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # as `python -m` does, so a task next to the config imports
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except ImportError as e:
        raise ConfigError(f"config key 'task': cannot import '{target}': {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"config key 'task': '{target}' has no function '{name}'")
    return fn


def build(cfg: Config, fn: Callable[[Config], Task]) -> Task:
    try:
        task = fn(cfg)
    except ModuleNotFoundError as e:
        hint = " (pip install 'ddptrain[examples]')" if e.name == "sklearn" else ""
        raise TaskError(f"task '{cfg.task}' needs the module '{e.name}', which is not installed{hint}") from None
    if isinstance(task, dict):
        try:
            task = Task(**task)
        except TypeError as e:
            raise TaskError(f"task '{cfg.task}': {e}") from None
    if not isinstance(task, Task):
        raise TaskError(f"task '{cfg.task}': expected the task function to return a ddptrain.Task, got {type(task).__name__}")
    if not isinstance(task.model, nn.Module):
        raise TaskError(f"task '{cfg.task}': model must be a torch.nn.Module, got {type(task.model).__name__}")
    for split in ("train", "val", "test"):
        ds = getattr(task, split)
        if ds is not None and len(ds) == 0:
            raise TaskError(f"task '{cfg.task}': the {split} dataset is empty")
    return task


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check(cfg: Config, task: Task, loss_fn, metrics: dict, elementwise_loss: bool) -> None:
    """Run the model on two training samples: items must be (input, target) and fit the model and loss."""
    name = f"task '{cfg.task}'"
    item = task.train[0]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise TaskError(f"{name}: training items must be (input, target) pairs, got {type(item).__name__}")
    x, y = default_collate([task.train[i] for i in range(min(2, len(task.train)))])
    model = task.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                out = model(x)
            except Exception as e:
                raise TaskError(f"{name}: the model fails on a training batch of input shape {_shape(x)}: {e}") from None
            if elementwise_loss and isinstance(out, torch.Tensor) and out.shape != y.shape:
                raise TaskError(f"{name}: loss '{cfg.loss.name}' expects the model output {_shape(out)} and the "
                                f"target {_shape(y)} to have the same shape")
            try:
                loss = loss_fn(out, y)
                for m in metrics.values():
                    m.batch_stats(out, y)
            except Exception as e:
                raise TaskError(f"{name}: loss or metrics fail on model output {_shape(out)} and target "
                                f"{_shape(y)}: {e}") from None
            if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
                raise TaskError(f"{name}: the loss must return a scalar tensor, got {_shape(loss)}")
    finally:
        model.train(was_training)
    known = ["loss", *metrics]
    if task.val is not None and cfg.early_stop.monitor[4:] not in known:
        import difflib
        close = difflib.get_close_matches(cfg.early_stop.monitor, [f"val_{k}" for k in known], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; available: {', '.join('val_' + k for k in known)}"
        raise ConfigError(f"config key 'early_stop.monitor': the task reports no {cfg.early_stop.monitor!r}{hint}")
