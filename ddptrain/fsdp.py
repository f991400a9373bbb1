"""FSDP2 (`dist.strategy: fsdp`): `fully_shard` on each block, then on the root, over a 1-D device mesh. Each
rank holds 1/N of the parameters, gradients and optimizer state, gathers a block's weights for its forward and
backward and reduce-scatters its gradients; it writes its own shards with Distributed Checkpoint (sharded.py).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import checkpoint as ckpt
from .async_save import Background, updated_in_place
from .config import Config
from .dist import Dist, broadcast_from_rank0
from .models import materialize, on_meta
from .sharded import load_sharded, save_sharded
from .strategy import Writes, blocks, checkpoint_blocks


class Sharded(Writes):
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
