"""How the model is spread over the ranks (`dist.strategy`), one small object per kind, so that the loop never
branches on it.

- `Replicated` (ddp, here): every rank holds the whole model; DDP all-reduces the gradients during backward.
  Its model and optimizer state are part of rank 0's checkpoint file.
- `Sharded` (fsdp, fsdp.py): PyTorch's FSDP2; each rank holds 1/N of the parameters, gradients and optimizer
  state, and writes its own shards with Distributed Checkpoint.

Each one wraps the model, turns gradient sync off for all micro-batches of a step but the last, says
whether the weights are finite (on every rank alike), and moves the model and optimizer state in and out.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from . import checkpoint as ckpt
from .async_save import Background, updated_in_place
from .config import Config, ConfigError
from .dist import Dist
from .models import materialize, on_meta
from .powersgd import PowerSGD

if TYPE_CHECKING:
    from .fsdp import Sharded


def build(cfg: Config, dist: Dist) -> "Replicated | Sharded":
    if cfg.dist.strategy == "fsdp":
        from .fsdp import Sharded
        return Sharded(cfg, dist)
    return Replicated(cfg, dist)


def checkpoint_blocks(module: nn.Module, is_block: Callable[[nn.Module], bool], compiled: bool = False) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (less memory). A block's
    batch norms update their running statistics once a step, as without it: the recomputation's update is undone
    (eager; a compiled graph applies the forward's alone, and torch.compile takes no such context)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                             checkpoint_wrapper)

    def wrapper(block: nn.Module) -> nn.Module:
        norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if compiled or not norms:
            return checkpoint_wrapper(block)
        return checkpoint_wrapper(block, context_fn=lambda: (contextlib.nullcontext(), _running_stats_kept(norms)))
    apply_activation_checkpointing(module, checkpoint_wrapper_fn=wrapper, check_fn=is_block)


@contextlib.contextmanager
def _running_stats_kept(norms: list[nn.Module]):
    """The batch norms' running statistics as they were before, once the recomputation is done."""
    kept = [(t, t.clone()) for m in norms for t in (m.running_mean, m.running_var, m.num_batches_tracked)
            if t is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, before in kept:
                t.copy_(before)


class Writes:
    """What both strategies do with a checkpoint written in the background (checkpoint.async_save)."""

    background: Background | None

    def before_update(self) -> None:
        """Before an optimizer step: a checkpoint's background copy of the parameters is done."""
        if self.background is not None:
            self.background.staged()

    def prepare(self, module: nn.Module, optimizer) -> None:
        """After the first optimizer step (the optimizer's state exists now): the CPU copy that background
        saves reuse is made in the background, ahead of the first save (when the run saves at all but for a
        preemption)."""
        c = self.cfg.checkpoint
        if self.background is not None and (c.every_steps or c.every_epochs):
            self._prepare(module, optimizer)

    def explained(self, e: Exception, step: int) -> Exception | None:
        """A failure of a forward or backward that the strategy's own setting explains, as one line; else None."""
        return None

    def wait(self) -> None:
        """Until the checkpoint write in flight is done; its failure as a CheckpointError."""
        if self.background is not None:
            self.background.wait()

    def close(self) -> None:
        """At the run's end: `wait`, then free the copies kept for the background writes."""
        if self.background is not None:
            self.background.close()


class Replicated(Writes):
    """DDP: a whole copy of the model per rank (or the bare model in one process)."""

    sharded = False

    def __init__(self, cfg: Config, dist: Dist):
        self.cfg, self.dist = cfg, dist
        self.model: nn.Module | None = None
        self.hook_state = self.powersgd = None  # dist.comm_hook powersgd: its state, and its keeper (powersgd.py)
        self.background = Background(pin=dist.device.type == "cuda") if cfg.checkpoint.async_save else None

    def wrap(self, module: nn.Module, init: Callable | None = None) -> nn.Module:
        """`module` on the device, or on the meta device: then it gets its weights here (`materialize`)."""
        if on_meta(module):
            materialize(module, init, self.cfg.seed)
            module.to(self.dist.device)
        if self.cfg.dist.activation_checkpointing:
            checkpoint_blocks(module, lambda m: m in set(blocks(module, self.cfg.dist.blocks)), self.cfg.train.compile)
        if not self.dist.active:
            self.model = module
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP
        d, device = self.cfg.dist, self.dist.device
        self.model = DDP(module, device_ids=[device] if device.type == "cuda" else None,
                         find_unused_parameters=d.find_unused_parameters, static_graph=d.static_graph,
                         gradient_as_bucket_view=d.gradient_as_bucket_view, bucket_cap_mb=d.bucket_cap_mb)
        self._register_comm_hook()
        return self.model

    def _register_comm_hook(self) -> None:
        """dist.comm_hook: gradients all-reduced in fp16 or bf16, or PowerSGD's low-rank compression."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
        d = self.cfg.dist
        if d.comm_hook == "powersgd":
            self.hook_state = powerSGD_hook.PowerSGDState(
                process_group=None, matrix_approximation_rank=d.powersgd_rank,
                start_powerSGD_iter=d.powersgd_start_step, random_seed=self.cfg.seed % 2**32)
            self.powersgd = PowerSGD(self.hook_state, self.model.module)
            self.model.register_comm_hook(self.hook_state, self.powersgd.hook)
        elif d.comm_hook == "bf16" and self.dist.backend != "nccl":
            raise ConfigError("config key 'dist.comm_hook': bf16 needs CUDA and NCCL (torch's bf16 hook); use fp16 "
                              "or powersgd here")
        elif d.comm_hook != "none":
            hook = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}[d.comm_hook]
            self.model.register_comm_hook(None, hook)

    def no_sync(self) -> Callable | None:
        """A context manager factory for the micro-batches whose gradients are not reduced yet."""
        return self.model.no_sync if self.dist.active else None

    def skipped(self) -> None:
        """After a step skipped for non-finite gradients: PowerSGD's state that it made non-finite starts afresh."""
        if self.powersgd is not None:
            self.powersgd.skipped()

    def explained(self, e: Exception, step: int) -> Exception | None:
        if "find_unused_parameters=True" in str(e):  # DDP's reducer, at the forward after a step that left some out
            return ConfigError(f"some of the model's parameters took no part in the loss of step {step - 1}, and DDP "
                               f"waits for every gradient (config key 'dist.find_unused_parameters' is false): set "
                               f"dist.find_unused_parameters: true, or freeze them (requires_grad=False)")
        return None

    def finite(self, watched: list[torch.Tensor]) -> bool:
        """Every rank holds the same weights: each can tell alone."""
        return ckpt.finite(watched)

    def state_parts(self, module: nn.Module, optimizer) -> dict:
        """The parts that go into rank 0's checkpoint file: here the model and the optimizer too."""
        return {"model": module, "optimizer": optimizer}

    def per_rank_parts(self) -> dict:
        """Each rank's own state: PowerSGD's error feedback and its random generator."""
        return {"comm_hook": self.powersgd} if self.hook_state is not None else {}

    def save(self, path: Path, state: dict | None, module: nn.Module, optimizer) -> None:
        """Write the checkpoint and prune older ones (rank 0; the others wait for the outcome in the caller); with
        checkpoint.async_save, a copy of the state in CPU memory is written in the background."""
        if state is None:
            return
        keep = self.cfg.checkpoint.keep_last

        def write(state):
            ckpt.save(path, state)
            ckpt.prune(path.parent, keep, path)
        if self.background is None:
            write(state)
            return
        self.background.save(state, updated_in_place(module, optimizer), write)  # `before_update` waits for its copy

    def _prepare(self, module: nn.Module, optimizer) -> None:
        if self.dist.env.is_main:  # the only rank that writes
            self.background.prepare({"model": module.state_dict(), "optimizer": optimizer.state_dict()})

    def load(self, path: Path, module: nn.Module, optimizer) -> None:
        """Nothing to do: the model and optimizer came with the checkpoint file's parts."""

    def name(self, stem: str) -> str:
        return stem + ".pt"  # a file

    def save_weights(self, path: Path, module: nn.Module, extra: dict) -> None:
        """best.pt: the model's weights alone (rank 0)."""
        if self.dist.env.is_main:
            ckpt.save(path, {"model": module.state_dict(), **extra})

    def load_weights(self, path: Path, module: nn.Module) -> str | None:
        """Rank 0 loads the weights if whole and fitting, then sends them to every rank; else why not.
        Call on all ranks."""
        why = None
        if self.dist.env.is_main:
            why = ckpt.verify(path)
            if why is None:
                try:
                    weights = ckpt.load(path)["model"]
                    why = ckpt.fits(module, weights)
                except (ckpt.CheckpointError, KeyError) as e:
                    why = str(e)
            if why is None:
                module.load_state_dict(weights)
        why = self.dist.broadcast_object(why)
        if why is None:
            self.dist.broadcast_module(module)
        return why


def blocks(module: nn.Module, names: list[str]) -> list[nn.Module]:
    """The modules to shard (or checkpoint) one by one: those whose class is named in `names`, or, when
    none is, every direct child that holds parameters (the layers of a ModuleList or ModuleDict child)."""
    if names:
        found = [m for m in module.modules() if type(m).__name__ in names and m is not module]
        if not found:
            present = sorted({type(m).__name__ for m in module.modules()})
            raise ConfigError(f"config key 'dist.blocks': no module of the model is a {' or '.join(names)}; its "
                              f"classes are {', '.join(present[:12])}")
        return found
    found = []
    for child in module.children():  # a ModuleList or ModuleDict of layers: each layer
        found += list(child.children()) if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else [child]
    return [m for m in found if any(True for _ in m.parameters())]
