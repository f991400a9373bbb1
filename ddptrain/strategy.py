"""How the model is spread over the ranks (`dist.strategy`), one small object per kind, so that the loop never
branches on it.

- `Replicated` (ddp): every rank holds the whole model; DDP all-reduces the gradients during backward.
  Its model and optimizer state are part of rank 0's checkpoint file.
- `Sharded` (fsdp): PyTorch's FSDP2 (`fully_shard` on each block, then on the root, over a 1-D device
  mesh): each rank holds 1/N of the parameters, gradients and optimizer state, gathers a block's weights
  for its forward and backward and reduce-scatters its gradients. Its model and optimizer state are
  written by every rank, its own shards, with Distributed Checkpoint (sharded.py).

Each one wraps the model, turns gradient sync off for all micro-batches of a step but the last, says
whether the weights are finite (on every rank alike), and moves the model and optimizer state in and out.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import checkpoint as ckpt
from .async_save import Background, updated_in_place
from .config import Config, ConfigError
from .dist import Dist, broadcast_from_rank0
from .models import materialize, on_meta
from .powersgd import PowerSGD
from .sharded import load_sharded, save_sharded


def build(cfg: Config, dist: Dist) -> "Replicated | Sharded":
    return Sharded(cfg, dist) if cfg.dist.strategy == "fsdp" else Replicated(cfg, dist)


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


class _Writes:
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


class Replicated(_Writes):
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


class Sharded(_Writes):
    """FSDP2: each rank holds a shard of every parameter, gradient and optimizer state."""

    sharded = True

    def __init__(self, cfg: Config, dist: Dist):
        self.cfg, self.dist = cfg, dist
        self.model: nn.Module | None = None
        self.background = self.group = None
        if cfg.checkpoint.async_save:  # DCP's background collectives get a gloo group of their own
            self.background = Background(pin=dist.device.type == "cuda")
            self.group = dist.new_group(cfg.dist.timeout_s)

    def wrap(self, module: nn.Module, init: Callable | None = None) -> nn.Module:
        """`module` on the device, or on the meta device: then each block gets its weights on the CPU and is
        sharded at once, so no rank ever holds more than one whole block (`materialize`)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
        d, tc = self.cfg.dist, self.cfg.train
        mesh = init_device_mesh(self.dist.device.type, (self.dist.env.world_size,))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
        kwargs = {"mesh": mesh, "reshard_after_forward": d.reshard_after_forward,
                  # bf16/fp16: parameters cast for compute, gradients reduced in fp32; fp32: FSDP's default
                  "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)}
        if d.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.dist.device.type == "cuda")
        found = blocks(module, d.blocks)
        if d.activation_checkpointing:
            checkpoint_blocks(module, lambda m: m in set(found), tc.compile)
            found = blocks(module, d.blocks)  # the wrappers now stand where the blocks were
        found = untied(module, found)
        if on_meta(module):
            materialize(module, init, self.cfg.seed, found, lambda block: fully_shard(block, **kwargs))
        else:
            for block in found:
                fully_shard(block, **kwargs)
        fully_shard(module, **kwargs)
        buffers = list(module.buffers())
        if buffers:  # each rank's own batches would make batch norm's running statistics drift apart
            module.register_forward_pre_hook(lambda m, args: _broadcast_buffers(buffers) if m.training else None)
        self.model = module
        return module

    def no_sync(self) -> Callable:
        @contextlib.contextmanager
        def without_sync():
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        return without_sync

    def skipped(self) -> None:
        """After a step skipped for non-finite gradients: nothing of FSDP's outlives the step."""

    def finite(self, watched: list[torch.Tensor]) -> bool:
        """Each rank sees its own shards: all must agree. Call on all ranks."""
        from .optim import local
        return not self.dist.any(not ckpt.finite([local(t) for t in watched]))

    def state_parts(self, module: nn.Module, optimizer) -> dict:
        return {}  # the model and optimizer go to Distributed Checkpoint, every rank its shards

    def per_rank_parts(self) -> dict:
        return {}

    def _states(self, module: nn.Module, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optimizer_state = get_state_dict(module, optimizer)
        return {"model": _rank0_buffers(model_state), "optimizer": optimizer_state}

    def _prepare(self, module: nn.Module, optimizer) -> None:
        self.background.prepare(self._states(module, optimizer), for_dcp=True)

    def save(self, path: Path, state: dict | None, module: nn.Module, optimizer) -> None:
        """Every rank writes its shards, rank 0 the rest; the directory counts only once all are whole.
        Call on all ranks."""
        save_sharded(path, self._states(module, optimizer), state, self.dist, self.cfg.checkpoint.keep_last,
                     self.background, self.group, updated_in_place(module, optimizer))

    def load(self, path: Path, module: nn.Module, optimizer) -> None:
        """Every rank reads its shards (resharded by DCP when the world size changed). Call on all ranks."""
        from torch.distributed.checkpoint.state_dict import set_state_dict
        states = self._states(module, optimizer)
        load_sharded(path, states)
        set_state_dict(module, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])

    def name(self, stem: str) -> str:
        return stem  # a directory of shards

    def save_weights(self, path: Path, module: nn.Module, extra: dict) -> None:
        """best/: the model's shards alone, and `extra`. Call on all ranks."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        save_sharded(path, {"model": _rank0_buffers(get_model_state_dict(module))},
                     extra if self.dist.env.is_main else None, self.dist)

    def load_weights(self, path: Path, module: nn.Module) -> str | None:
        """Every rank reads its shards of the weights if the directory is whole; else why not. Call on all ranks."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
        why = self.dist.broadcast_object(ckpt.verify(path) if self.dist.env.is_main else None)
        if why is not None:
            return why
        error = None
        try:
            weights = {"model": get_model_state_dict(module)}
            load_sharded(path, weights)
            set_model_state_dict(module, weights["model"])
        except ckpt.CheckpointError as e:
            error = str(e)
        return self.dist.first_error(error)


@torch._disable_dynamo
def _broadcast_buffers(buffers: list[torch.Tensor]) -> None:
    """Rank 0's buffers on every rank, as DDP copies them before every forward in training (FSDP shards only the
    parameters: the buffers are each rank's own). Call on all ranks."""
    broadcast_from_rank0(buffers)


def _rank0_buffers(state: dict) -> dict:
    """A model state dict with copies of rank 0's buffers, the tensors that FSDP leaves whole (its parameters are
    DTensors): DCP writes one rank's copy of such a tensor, not necessarily rank 0's, which DDP saves and every rank
    continues from. Call on all ranks."""
    keys = [k for k, v in state.items() if isinstance(v, torch.Tensor) and not hasattr(v, "to_local")]
    if not keys:
        return state
    copies = [state[k].detach().clone() for k in keys]
    _broadcast_buffers(copies)
    return {**state, **dict(zip(keys, copies))}


def untied(module: nn.Module, found: list[nn.Module]) -> list[nn.Module]:
    """The blocks that FSDP2 can shard on their own: a block with a parameter that a module outside it holds
    too (tied embeddings: an embedding and a head) stays in the root's group instead, as fully_shard requires."""
    holders: dict[int, set[int]] = {}  # a parameter's id -> the ids of the modules that hold it
    for m in module.modules():
        for _, p in m.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(p), set()).add(id(m))
    kept = []
    for block in found:
        inside = {id(m) for m in block.modules()}
        if all(holders[id(p)] <= inside for p in block.parameters()):
            kept.append(block)
    return kept


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
