"""Optimizers, learning-rate schedules, the L1 penalty, and the optimizer step (unscale, clip, step).

Optimizers and schedules are named (the built-ins) or given by import path, or the task supplies them.
Weight decay and L1 apply to weights with two or more dimensions; biases and norm parameters are
exempt, as in most modern recipes (through parameter groups, for any optimizer). Every schedule except
plateau (ReduceLROnPlateau, stepped at each validation) steps once per optimizer step.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.optim import lr_scheduler as sch

from .config import OPTIMIZERS, SCHEDULES, SPANS_RUN, ConfigError, OptimConfig, SchedConfig, TrainConfig
from .importing import import_object, message, user_frame
from .precision import Precision


def _decayed(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters, weights with 2+ dimensions apart from the exempt biases and norms."""
    decay, no_decay = _decayed(model)
    # Every group names its weight decay, so that an optimizer's own default (AdamW's 0.01) never applies
    # unseen; an optimizer without weight decay keeps the key unused.
    if weight_decay == 0:  # one group: each group is a separate foreach update per step
        return [{"params": decay + no_decay, "weight_decay": 0.0}]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _built(what: str, make: Callable, expected: type | None = None):
    """make(), where a failure (the user's optimizer or schedule, or its arguments) or an object of the wrong type
    is one line naming `what`: the config keys and their values, or the task's function and its file:line."""
    from .task import TaskError
    try:
        made = make()
    except (ConfigError, TaskError):
        raise
    except Exception as e:
        if what.startswith("config"):  # torch's own classes (or the user's, named by import path) and the config's arguments
            raise ConfigError(f"{what} raised {type(e).__name__}: {message(e)}") from e
        raise TaskError(f"{what} raised {type(e).__name__}: {message(e)} ({user_frame(e)})") from e
    if expected is not None and not isinstance(made, expected):
        wrong = f"{what}: expected a torch.optim.{expected.__name__}, got {type(made).__name__}"
        raise ConfigError(wrong) if what.startswith("config") else TaskError(wrong)
    return made


def build_optimizer(model: nn.Module, cfg: OptimConfig, task_optimizer: Callable | None = None) -> torch.optim.Optimizer:
    """The task's optimizer (given the parameter groups), else the configured one by name or import path."""
    groups = param_groups(model, cfg.weight_decay)
    if task_optimizer is not None:
        return _built("the task's optimizer (Task.optimizer)", lambda: task_optimizer(groups), torch.optim.Optimizer)
    what = f"config keys 'optim.name', 'optim.args': {cfg.name} with lr={cfg.lr:g} and args {cfg.args}"
    return _built(what, lambda: _named_optimizer(groups, cfg), torch.optim.Optimizer)


def _named_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name not in OPTIMIZERS:
        return import_object(cfg.name, "optim.name")(groups, lr=cfg.lr, **cfg.args)
    kw = dict(lr=cfg.lr, **cfg.args)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, **kw)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, betas=tuple(cfg.betas), eps=cfg.eps, **kw)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, betas=tuple(cfg.betas), eps=cfg.eps, **kw)
    return torch.optim.RMSprop(groups, momentum=cfg.momentum, eps=cfg.eps, **kw)


def l1_penalty(model: nn.Module, strength: float) -> torch.Tensor | float:
    """The L1 term of the objective. Under FSDP a parameter may be this rank's shard (a DTensor, once its block
    is resharded after the forward): its own part of the penalty, whose gradient goes to that shard alone, as
    the whole penalty's would (the penalty is the same on every rank, so it needs no reduction)."""
    if strength == 0:
        return 0.0
    decay, _ = _decayed(model)
    return strength * sum(local(p).abs().sum() for p in decay)


def unknown_length(name: str) -> ConfigError:
    return ConfigError(f"config key 'sched.name': {name} is laid out over the whole run, whose length is unknown (the "
                       f"training set is a stream without __len__); set train.max_steps, or give the stream a __len__")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedConfig, total_steps: int, lr: float,
                    task_scheduler: Callable | None = None, mode: str = "min"):
    """Return the scheduler; `total_steps` is the number of optimizer steps the run will take (None: unknown,
    a stream without a length and no train.max_steps); `mode` (early_stop.mode) says whether plateau's
    monitored value improves as it falls (min) or rises (max)."""
    if task_scheduler is not None:
        return _built("the task's schedule (Task.scheduler)", lambda: task_scheduler(optimizer, total_steps))
    if total_steps is None and cfg.name in SPANS_RUN:
        raise unknown_length(cfg.name)
    if cfg.name == "plateau":
        return sch.ReduceLROnPlateau(optimizer, mode=mode, factor=cfg.gamma, patience=cfg.plateau_patience)
    if cfg.name == "onecycle":
        return sch.OneCycleLR(optimizer, max_lr=lr, total_steps=max(total_steps, 2), pct_start=cfg.pct_start)
    warmup = cfg.warmup_steps if total_steps is None else min(cfg.warmup_steps, max(total_steps - 1, 0))
    rest = None if total_steps is None else max(total_steps - warmup, 1)  # only the schedules that span the run use it
    if cfg.name not in SCHEDULES:
        schedule = import_object(cfg.name, "sched.name")
        main = _built(f"config keys 'sched.name', 'sched.args': {cfg.name} with args {cfg.args}",
                      lambda: schedule(optimizer, **cfg.args))
        if isinstance(main, sch.ReduceLROnPlateau):
            return main
    elif cfg.name == "constant":
        main = sch.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif cfg.name == "step":
        main = sch.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    elif cfg.name == "cosine":
        main = sch.CosineAnnealingLR(optimizer, T_max=rest, eta_min=cfg.min_lr)
    else:
        main = sch.LambdaLR(optimizer, lambda s: 1 - (1 - cfg.min_lr / lr) * min(s, rest) / rest)
    if warmup == 0:
        return main
    ramp = sch.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup)
    return sch.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def changes_lr(scheduler) -> bool:
    """Whether stepping the schedule after each optimizer step changes anything: not for plateau (stepped with the
    monitored value, after validation), nor for a constant one (ConstantLR by a factor of 1, the `constant` schedule
    without warmup), whose stepping would only cost time at every step."""
    if isinstance(scheduler, sch.ReduceLROnPlateau):
        return False
    return not (type(scheduler) is sch.ConstantLR and scheduler.factor == 1.0)


def optimizer_step(params: list[nn.Parameter], optimizer, precision: Precision, tc: TrainConfig,
                   measure: bool = True, unscaled: Callable[[], None] | None = None) -> tuple[torch.Tensor | None, bool]:
    """Unscale, clip, step. Return (pre-clip global grad norm, or None if not measured; whether it stepped).
    `unscaled()` sees the gradients once unscaled, before clipping (per-layer norms, at log steps).

    `params` is the model's parameter list, made once: walking the module tree at every step costs
    as much as the norm on a small model. The norm is computed where clipping needs it, where
    `measure` asks for it (log steps), and with `train.nonfinite: skip`, which alone makes the host
    wait for the device at every step to decide whether to step.
    """
    precision.unscale(optimizer)
    if unscaled is not None:
        unscaled()
    norm = None
    if tc.clip_grad_norm is not None:
        norm = nn.utils.clip_grad_norm_(params, tc.clip_grad_norm)  # torch's clipping passes over missing gradients
    elif measure or tc.nonfinite == "skip":
        norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):  # FSDP: the global norm over all shards, the same on every rank
        norm = norm.full_tensor()
    if tc.clip_grad_value is not None:
        nn.utils.clip_grad_value_(params, tc.clip_grad_value)
    # The gradients were all-reduced, so the norm (and the decision) is the same on every rank
    # without another collective. fp16's scaler makes this decision itself.
    if tc.nonfinite == "skip" and precision.scaler is None and not bool(torch.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        return norm, False
    stepped = precision.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return norm, stepped


def nonfinite_count(params: list[nn.Parameter]) -> torch.Tensor:
    """How many of the tensors (this rank's shards of them, under FSDP) hold a NaN or Inf, as a device tensor
    (no host sync)."""
    return torch.stack([torch.isfinite(local(p)).all() for p in params]).logical_not().sum()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a DTensor under FSDP); any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t
