"""The user's side of the contract: a task function returns the model, the data, the loss and metrics.

`task: "my_pkg.my_module:build"` (or `path/to/file.py:build`, or a built-in name) names a function
that takes the Config and returns a Task. Before any process group exists, `check` runs the model on
two training samples, so data of the wrong shape fails with a message instead of a deep traceback.
How a batch reaches the model is batch.py's business; a task can take it over with `step`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from .batch import Forward, call, collate_for, describe, on_cpu, to_device
from .checkpoint import CheckpointError
from .config import Config, ConfigError, ModelConfig
from .dist import is_collective_failure
from .importing import import_object, message, user_frame
from .losses import ELEMENTWISE, as_metric, build_loss
from .models import on_meta, uninitialisable
from .runlog import warn_once

BUILTIN = {"digits": "ddptrain.tasks.digits:build", "diabetes": "ddptrain.tasks.diabetes:build"}


class TaskError(ValueError):
    """The task or its data does not fit what training needs; a plain user mistake."""


def user_error(e: Exception, what: str) -> Exception:
    """A failure of the user's data, model or loss met during the run, as one line naming the user's file:line
    (only this rank may have met it); a collective failure or one of ddptrain's own errors stays as it is."""
    if isinstance(e, (TaskError, ConfigError, CheckpointError)) or is_collective_failure(e):
        return e
    error = TaskError(f"{what} raised {type(e).__name__}: {message(e)} ({user_frame(e)})")
    error.rank_specific = True
    return error


@dataclass
class Task:
    model: nn.Module
    train: Dataset  # map-style, or a stream (IterableDataset): see stream.py
    val: Dataset | None = None
    test: Dataset | None = None
    # (output, target) -> mean loss; "model": the model returns its own loss; None: the config's loss.name
    loss: Callable[[Any, Any], torch.Tensor] | str | None = None
    metrics: dict = field(default_factory=dict)  # name -> per-sample function or Metric object
    # step(model, batch) -> loss or (loss, output, target): the whole forward pass, for any other shape
    step: Callable[[nn.Module, Any], Any] | None = None
    optimizer: Callable[[list[dict]], torch.optim.Optimizer] | None = None  # (param groups) -> optimizer
    scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None    # (optimizer, total steps) -> schedule
    collate: Callable[[list], Any] | None = None  # the DataLoaders' collate_fn (default: torch's, plus dataclasses)
    target_key: str = "labels"  # the target's field in dict, dataclass and named-tuple items
    # a model built on the meta device: init(module) gives one module's own parameters and buffers their
    # values, in module order (default: its reset_parameters()); see models.materialize
    init: Callable[[nn.Module], None] | None = None
    reads_model_config: bool = field(default=True, init=False, repr=False)  # set by build(): does it read model.*?


def resolve(spec: str) -> Callable[[Config], Task]:
    """Import the function named by `module:function`, `file.py:function` or a built-in task name."""
    spec = BUILTIN.get(spec, spec)
    if ":" not in spec:
        raise ConfigError(f"config key 'task': expected a built-in task ({', '.join(BUILTIN)}) or "
                          f"'module:function', got {spec!r}")
    fn = import_object(spec, "task")
    if not callable(fn):
        raise ConfigError(f"config key 'task': '{spec}' is not a function")
    return fn


class _Reads:
    """A config section that records which of its keys are read."""

    def __init__(self, section):
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._section, name)


def build(cfg: Config, fn: Callable[[Config], Task]) -> Task:
    """The task, from its function; `task.reads_model_config` says whether it looked at `model.*`."""
    import dataclasses
    model_keys = _Reads(cfg.model)
    try:
        task = fn(dataclasses.replace(cfg, model=model_keys))
    except ModuleNotFoundError as e:
        hint = " (pip install 'ddptrain[examples]')" if e.name == "sklearn" else ""
        raise TaskError(f"task '{cfg.task}' needs the module '{e.name}', which is not installed{hint}") from None
    except (ConfigError, TaskError):
        raise
    except Exception as e:
        raise TaskError(f"task '{cfg.task}': the task function raised {type(e).__name__}: {e} "
                        f"({user_frame(e)})") from e
    if isinstance(task, dict):
        try:
            task = Task(**task)
        except TypeError as e:
            raise TaskError(f"task '{cfg.task}': {e}") from None
    if not isinstance(task, Task):
        raise TaskError(f"task '{cfg.task}': expected the task function to return a ddptrain.Task, got {type(task).__name__}")
    if not isinstance(task.model, nn.Module):
        raise TaskError(f"task '{cfg.task}': model must be a torch.nn.Module, got {type(task.model).__name__}")
    if not isinstance(task.metrics, dict):
        raise TaskError(f"task '{cfg.task}': metrics must be a dict of name -> metric, got {type(task.metrics).__name__}")
    for split in ("train", "val", "test"):
        _check_dataset(cfg.task, split, getattr(task, split))
    task.reads_model_config = bool(model_keys.read)
    changed = [f"model.{k}" for k, v in vars(cfg.model).items() if getattr(ModelConfig(), k) != v]
    if changed and not task.reads_model_config:
        warn_once(f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} set, but task '{cfg.task}' does not read "
             f"cfg.model (only the built-in tasks' MLP does): ignored, and not pinned when the run resumes")
    return task


def _check_dataset(task: str, split: str, ds) -> None:
    """A map-style dataset (`__getitem__` and `__len__`, not empty) or a stream (an IterableDataset)."""
    if ds is None or isinstance(ds, IterableDataset):
        return
    getitem = getattr(type(ds), "__getitem__", None)
    if getitem is None or getitem is Dataset.__getitem__ or not hasattr(ds, "__len__"):
        raise TaskError(f"task '{task}': the {split} set ({type(ds).__name__}) must be a map-style dataset (with "
                        f"__getitem__ and __len__) or a stream (a subclass of torch.utils.data.IterableDataset)")
    try:
        empty = len(ds) == 0
    except Exception as e:
        raise TaskError(f"task '{task}': len() of the {split} set raised {type(e).__name__}: {message(e)} "
                        f"({user_frame(e)})") from None
    if empty:
        raise TaskError(f"task '{task}': the {split} dataset is empty")


def _in_user_code(e: Exception) -> str:
    """` (file:line)` where the user's code raised, if it did (not torch's or ddptrain's)."""
    where = user_frame(e, fallback=False)
    return f" ({where})" if where else ""


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def prepare(cfg: Config, task: Task) -> tuple[Forward, dict]:
    """The task's forward pass (by the batch rules, or its `step`) and metrics, checked on two samples."""
    loss_fn = build_loss(cfg.loss) or task.loss
    if isinstance(loss_fn, str) and loss_fn != "model":
        raise TaskError(f"task '{cfg.task}': Task.loss must be a function or 'model', got {loss_fn!r} (name "
                        f"built-in losses with the config key loss.name)")
    if loss_fn is None and task.step is None:
        raise ConfigError("config key 'loss.name': the task returns no loss; name one (cross_entropy, mse, l1, "
                          "huber, bce_with_logits, or model when the model computes its own)")
    forward = Forward(loss_fn, task.step, task.target_key, task.model)
    metrics = {name: as_metric(m) for name, m in task.metrics.items()}
    check(cfg, task, forward, metrics)
    return forward, metrics


def check(cfg: Config, task: Task, forward: Forward, metrics: dict) -> None:
    """Run the model on a batch of two training samples: it must fit the model, the loss and the metrics."""
    name = f"task '{cfg.task}'"
    batch = _first_batch(name, task)
    forward.cpu_batches = on_cpu(batch)
    # A model the task compiled is checked as the network it wraps: the check is not worth a compilation,
    # and torch.compile warns under the FLOP counter's global module hooks.
    model = getattr(task.model, "_orig_mod", task.model)
    if on_meta(model):  # the shapes are checked on the meta device: no weights are needed for them
        missing = uninitialisable(model) if task.init is None else None
        if missing:
            raise TaskError(f"{name}: the model is on the meta device, and module {missing} has parameters or "
                            f"buffers of its own but no reset_parameters() to give them values; give "
                            f"Task(init=fn), fn(module) initialising one module's own parameters and buffers")
        batch = to_device(batch, torch.device("meta"))
    elif (weight := next(itertools.chain(model.parameters(), model.buffers()), None)) is not None:
        batch = to_device(batch, weight.device)  # where the model is: the training device (preflight.prepare)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _check_step(name, cfg, task, forward, model, batch, metrics)
    finally:
        model.train(was_training)
    known = ["loss", *metrics]
    if task.val is not None and cfg.early_stop.monitor[4:] not in known:
        import difflib
        close = difflib.get_close_matches(cfg.early_stop.monitor, [f"val_{k}" for k in known], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; available: {', '.join('val_' + k for k in known)}"
        raise ConfigError(f"config key 'early_stop.monitor': the task reports no {cfg.early_stop.monitor!r}{hint}")


def _first_batch(name: str, task: Task):
    """A batch of the training set's first two items, collated by the task's collate (set to the default for
    such items when it gives none)."""
    if isinstance(task.train, IterableDataset):
        try:
            items = list(itertools.islice(task.train, 2))
        except Exception as e:
            raise TaskError(f"{name}: reading the training stream raised {type(e).__name__}: {e} ({user_frame(e)})") from None
        if not items:
            raise TaskError(f"{name}: the training stream is empty")
    else:
        try:
            items = [task.train[i] for i in range(min(2, len(task.train)))]
        except Exception as e:
            raise TaskError(f"{name}: reading the training set's first items raised {type(e).__name__}: "
                            f"{message(e)} ({user_frame(e)})") from None
    if task.collate is None:
        task.collate = collate_for(items[0])
    try:
        return task.collate(items)
    except Exception as e:
        raise TaskError(f"{name}: training items cannot be batched ({describe(items[0])}): {e}{_in_user_code(e)}") from None


def _check_step(name: str, cfg: Config, task: Task, forward: Forward, model, batch, metrics: dict) -> None:
    """The step (or the forward and the loss) on `batch`, its FLOPs per sample counted, then the metrics on its
    output and target, and the loss's shape."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as flops:  # counts matrix products, convolutions, attention
        if task.step is not None:
            try:
                c = forward(model, batch)
            except Exception as e:
                raise TaskError(f"{name}: the task's step fails on a training batch {describe(batch)}: "
                                f"{e}{_in_user_code(e)}") from None
        else:
            c = _check_forward(name, cfg, forward, model, batch)
    forward.flops_per_sample = flops.get_total_flops() // max(c.samples, 1)
    try:
        for metric_name, m in metrics.items():
            if c.output is None or c.target is None:
                raise TaskError(f"{name}: metrics need the output and the target; let the step return "
                                f"(loss, output, target)")
            _check_metric(name, metric_name, m, c)
    except TaskError:
        raise
    except Exception as e:
        raise TaskError(f"{name}: metrics fail on model output {describe(c.output)} and target "
                        f"{describe(c.target)}: {e}{_in_user_code(e)}") from None
    if not (isinstance(c.loss, torch.Tensor) and c.loss.dim() == 0):
        raise TaskError(f"{name}: the loss must be a scalar tensor, got {_shape(c.loss)}")
    if forward.num_items and not on_meta(model):
        _check_num_items(name, forward, model, batch, c.loss)


def _check_metric(name: str, metric_name: str, m, c) -> None:
    from .losses import Mean
    if isinstance(m, Mean):
        values = m.fn(c.output, c.target)
        if not (isinstance(values, torch.Tensor) and values.dim() >= 1 and len(values) == c.samples):
            raise TaskError(f"{name}: metric '{metric_name}' must return one value per sample (first dimension "
                            f"{c.samples} here), got {_shape(values)}; a batch mean would be weighted wrongly "
                            f"(give an object with batch_stats/compute for a metric that is not a mean)")
    if not (isinstance(c.output, torch.Tensor) and c.output.is_meta):  # a metric may read values (.item())
        m.batch_stats(c.output, c.target)


def _broadcasts_up(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        return False
    return shape != a.shape and shape != b.shape


def _check_num_items(name: str, forward: Forward, model: nn.Module, batch, mean: torch.Tensor) -> None:
    """A forward that takes **kwargs may drop num_items_in_batch, and its mean loss would then go unweighted (k
    micro-batches' means summed): given twice the batch's count, a loss that divides by it is about half its mean."""
    n = forward.counted(batch)
    if not n or not torch.isfinite(mean) or mean == 0:
        return
    try:
        given, why = forward(model, batch, num_items=2 * n).loss, "its loss does not divide by it"
        if abs(float(given)) < 0.75 * abs(float(mean)):
            return
    except Exception as e:
        why = f"the model fails when given it ({type(e).__name__}: {message(e)})"
    forward.num_items = False
    warn_once(f"{name}: the model's forward takes num_items_in_batch (or **kwargs), but {why}; ddptrain weights its loss, "
         f"a mean, by its tokens instead (set accepts_loss_kwargs = False on the model to say so)")


def _check_forward(name: str, cfg: Config, forward: Forward, model: nn.Module, batch):
    try:
        inputs, target = forward.split(batch)
    except TypeError as e:
        raise TaskError(f"{name}: {e}") from None
    if target is None and not forward.own_loss:
        raise TaskError(f"{name}: the training items have no '{forward.target_key}' (the target); name it with "
                        f"Task(target_key=...), or set loss.name=model if the model computes its own loss")
    try:
        out = call(model, inputs)
    except Exception as e:
        raise TaskError(f"{name}: the model fails on a training batch of input {describe(inputs)}: "
                        f"{e}{_in_user_code(e)}") from None
    if isinstance(out, torch.Tensor) and isinstance(target, torch.Tensor) and out.shape != target.shape:
        loss = f"loss '{cfg.loss.name}'" if cfg.loss.name != "task" else "the task's loss"
        if cfg.loss.name in ELEMENTWISE:
            raise TaskError(f"{name}: {loss} expects the model output {_shape(out)} and the target "
                            f"{_shape(target)} to have the same shape")
        if target.is_floating_point() and _broadcasts_up(out, target):
            raise TaskError(f"{name}: the model output {_shape(out)} and the target {_shape(target)} broadcast to "
                            f"{tuple(torch.broadcast_shapes(out.shape, target.shape))} in {loss}, which would "
                            f"compare every output with every target; reshape the target to {_shape(out)}")
    try:
        return forward(lambda *a, **k: out, batch)  # the loss of the output just computed
    except Exception as e:
        raise TaskError(f"{name}: the loss fails on model output {describe(out)} and target {describe(target)}: "
                        f"{e}{_in_user_code(e)}") from None
