"""The built-in MLP (activation, dropout, batch norm, initialisation), SyncBatchNorm conversion, and models
built on the meta device: checked there, then given real weights module by module (`materialize`)."""
from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
from torch import nn

from .config import ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def mlp(in_features: int, out_features: int, cfg: ModelConfig) -> nn.Sequential:
    """Linear -> [BatchNorm] -> activation -> [Dropout] per hidden width, then a linear head."""
    layers: list[nn.Module] = []
    width = in_features
    for hidden in cfg.hidden:
        layers.append(nn.Linear(width, hidden, bias=not cfg.batch_norm))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(ACTIVATIONS[cfg.activation]())
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        width = hidden
    layers.append(nn.Linear(width, out_features))
    model = nn.Sequential(*layers)
    initialise(model, cfg.init, cfg.activation)
    return model


def initialise(model: nn.Module, scheme: str, activation: str = "relu") -> None:
    """Re-initialise the weights of every Linear layer: kaiming (He), xavier (Glorot), or torch's default."""
    if scheme == "default":
        return
    gain_name = "relu" if activation in ("relu", "gelu") else activation
    for m in model.modules():
        if isinstance(m, nn.Linear):
            if scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu" if gain_name == "relu" else "linear")
            else:
                nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain(gain_name))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm*d becomes SyncBatchNorm: statistics over the global batch, not each rank's shard."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def on_meta(model: nn.Module) -> bool:
    """Built on the meta device (`with torch.device("meta"): ...`): shapes without storage."""
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def _own_state(m: nn.Module) -> bool:
    """The module has parameters or buffers of its own on the meta device (to be given weights). Those of a
    module whose own are real (weights loaded into part of a meta-built model) are kept as they are."""
    own = list(itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False)))
    return any(t.is_meta for t in own)


def uninitialisable(model: nn.Module) -> str | None:
    """The first module (by name) with parameters or buffers of its own on the meta device but no
    reset_parameters(), if any."""
    return next((f"'{name}' ({type(m).__name__})" if name else f"{type(m).__name__} (the model itself)"
                 for name, m in model.named_modules()
                 if _own_state(m) and not callable(getattr(m, "reset_parameters", None))), None)


def materialize(model: nn.Module, init: Callable[[nn.Module], None] | None, seed: int,
                blocks: Iterable[nn.Module] = (), done: Callable[[nn.Module], None] = lambda block: None) -> None:
    """Give a model built on the meta device real weights, on the CPU, module by module in module order:
    each module with parameters or buffers of its own gets storage (`to_empty`) and `init(module)` (default:
    its `reset_parameters()`, as torch's layers do when built), drawing from RNG streams seeded by `seed`
    alone. So the weights are those of the model built normally right after seeding with `seed` (where it
    builds its modules in their order), on any rank and for any world size; the training's RNG is untouched.
    Weights tied before (one parameter in two modules) are tied again. Each of `blocks` is passed to `done`
    once its last module has weights: fsdp shards it there, so only one block is ever whole in memory."""
    from .state import OwnRng
    ends = {id(list(block.modules())[-1]): block for block in blocks}
    first: dict[int, nn.Parameter] = {}  # a meta parameter's id -> what it became where it was met first
    metas = []  # keeps the meta parameters alive, so that their ids stay theirs
    rng = OwnRng()
    rng.seed(seed)
    with rng:
        for m in list(model.modules()):
            before = {name: p for name, p in m._parameters.items() if p is not None}
            metas.extend(before.values())
            if _own_state(m):
                m.to_empty(device="cpu", recurse=False)
                with torch.no_grad():
                    (init or type(m).reset_parameters)(m)
            for name, p in before.items():
                if id(p) in first:
                    setattr(m, name, first[id(p)])
                else:
                    first[id(p)] = getattr(m, name)
            if id(m) in ends:
                done(ends[id(m)])
