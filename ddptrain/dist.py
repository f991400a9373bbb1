"""Who am I in the job, and the few collectives the loop needs.

`detect()` is a pure function from environment variables to a frozen DistEnv. `Dist` holds the
process group once it exists; at world size 1 it has none and every collective is a no-op, so the
training loop never branches on "am I distributed". A program that made the process group itself
(init_process_group, then ddptrain.train or evaluate) keeps it: ddptrain joins it (`in_callers_group`)
and leaves it as it found it.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launcher: str = "single"  # torchrun | slurm | single
    restart_count: int = 0    # torchrun elastic restarts so far

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise ConfigError(f"environment variable {name}: expected an integer, got {env.get(name)!r}") from None


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank died, stalled or cannot be reached."""


def is_collective_failure(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        s in text for s in ("Timed out", "timed out", "Connection closed by peer", "Connection reset"))


def explain_failure(error: RuntimeError, env: DistEnv, phase: str, step: int,
                    timeout: str = "dist.timeout_s=300", recorded: str | None = None) -> CollectiveError | None:
    """A collective's failure as one sentence that names the likely cause, or None if it is something else.
    `recorded`: where the Flight Recorder dumps this rank's last collectives (NCCL), if it does."""
    text = str(error)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if is_collective_failure(error):
        where = f"; this rank's last collectives are in {recorded}{env.rank} (Flight Recorder)" if recorded else ""
        return CollectiveError(
            f"[rank {env.rank}] a collective failed during {phase} (step {step}): another rank "
            f"died, stalled or is unreachable; the timeout in force was {timeout} s "
            f"({first}){where}")
    return None


def detect(env: Mapping[str, str]) -> DistEnv:
    """Read the launcher's variables. torchrun's win over SLURM's: under `srun torchrun`, SLURM's describe nodes."""
    if ("RANK" in env) != ("WORLD_SIZE" in env):
        have, missing = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
        raise ConfigError(f"environment variable {have} is set ({env[have]!r}) but {missing} is not: a launcher "
                          f"sets both (torchrun does); unset {have} to run one process")
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            local_world_size=_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1,
            launcher="torchrun",
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
        )
    # SLURM_STEP_ID is set only inside an srun step: a plain `python` in the batch shell of a
    # multi-task allocation also sees SLURM_NTASKS, but no other task will ever join it.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and _int(env, "SLURM_NTASKS") > 1:
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", "1"))
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"), world_size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID"),
            local_world_size=int(tasks_per_node.split("(")[0].split(",")[0] or 1),
            launcher="slurm",
            restart_count=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
        )
    return DistEnv()


def in_callers_group(env: DistEnv) -> DistEnv:
    """`env` as the process group that the calling program made before ddptrain has it, if there is one: its
    rank and world size are the job's. Without a launcher's variables the ranks are taken to share one node
    (as mp.spawn starts them), each using the GPU of its rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return env
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if (rank, world_size) == (env.rank, env.world_size):
        return env
    if env.launcher != "single":
        raise ConfigError(f"the process group made before ddptrain has rank {rank} of {world_size}, but the "
                          f"{env.launcher} variables say rank {env.rank} of {env.world_size}; expected the same: "
                          f"make the group from them (init_process_group() with no rank or world_size)")
    return replace(env, rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size)


def pick_device(env: DistEnv, device: str, backend: str) -> tuple[torch.device, str]:
    """Return (device, backend) for this rank from the dist config's `device` and `backend`."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("config key 'dist.device': 'cuda' was asked for but CUDA is not available")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("config key 'dist.backend': 'nccl' needs CUDA; use 'gloo' or 'auto' on CPU")
    if use_cuda and env.local_rank >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"config key 'dist.device': this node's rank {env.local_rank} (LOCAL_RANK) needs CUDA device "
                          f"{env.local_rank}, but the node has {count}: one GPU per rank, so start at most {count} "
                          f"per node (--nproc-per-node={count}), or set dist.device=cpu")
    dev = torch.device("cuda", env.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    return dev, backend


class Dist:
    """The process group of this run and the collectives the loop uses.

    Every method that communicates says "call on all ranks": every rank must call it, in the same order.
    """

    def __init__(self, env: DistEnv, device: torch.device, backend: str, init_timeout_s: float,
                 rank0_timeout_s: float):
        self.env, self.device, self.backend = env, device, backend
        self.control = None  # gloo, for objects and flags; the same timeout as the training collectives
        self.patient = None  # gloo, only for waiting while rank 0 evaluates alone (val.mode: rank0)
        self.timeout_key, self.timeout_s = "dist.init_timeout_s", init_timeout_s  # the one in force, for messages
        self.rank0_timeout_s = rank0_timeout_s
        self.groups = []  # the groups made here, beside the default one
        # A group the calling program made is its own: used as it is, never destroyed here (`close`).
        self.owned = not self.active
        if not self.owned:
            self.backend = dist.get_backend()
        if env.world_size == 1:
            return
        if not self.owned:
            self._check_callers_group()
        if self.owned:
            self._init(init_timeout_s)
        try:
            self.control = self.new_group(init_timeout_s)
            self.patient = self.new_group(rank0_timeout_s)
        except BaseException:
            self.close()
            raise

    def _init(self, init_timeout_s: float) -> None:
        """Make the default process group, from the launcher's variables."""
        env, device, backend = self.env, self.device, self.backend
        timeout = datetime.timedelta(seconds=init_timeout_s)
        kwargs = dict(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
        if backend == "nccl":
            kwargs["device_id"] = device
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun shares its rendezvous store with the workers and reuses it across elastic
            # restarts; without a per-attempt prefix gloo reads the peer addresses of the previous,
            # dead attempt and fails or hangs (pytorch#135712). On one node the restart count names
            # the attempt; across nodes it can differ between agents (a healthy node restarts without
            # counting), so there only a fresh store per attempt helps: the launch scripts set
            # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for the agents, and then this branch is not taken.
            if env.world_size == env.local_world_size:
                store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                      env.world_size, is_master=False, timeout=timeout)
                kwargs["store"] = dist.PrefixStore(f"ddptrain/attempt_{env.restart_count}", store)
            elif env.is_main and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
                import warnings
                warnings.warn("multi-node elastic restarts are unreliable with torchrun's shared rendezvous "
                              "store; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for every torchrun agent "
                              "(launch/ and slurm/ scripts do)", stacklevel=2)
        dist.init_process_group(**kwargs)

    def _check_callers_group(self) -> None:
        """The caller's group must carry this run's tensors: an NCCL group has no backend for CPU ones, and DDP
        would fail at its first broadcast with an error that names neither."""
        try:
            dist.distributed_c10d._get_default_group()._get_backend(self.device)
        except RuntimeError:
            raise ConfigError(f"config key 'dist.device': this run's tensors are on {self.device.type}, but the "
                              f"process group made before ddptrain (backend {self.backend}) has no backend for "
                              f"{self.device.type} tensors; expected a group that carries them: make it with "
                              f"backend 'gloo' (or 'cpu:gloo,cuda:nccl'), or set dist.device to match it") from None

    def new_group(self, timeout_s: float):
        """A gloo group of every rank, for objects and flags, that `close` destroys. Call on all ranks."""
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.groups.append(group)
        return group

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def set_timeout(self, seconds: float) -> None:
        """Shorten the collective timeout once start-up is over, so a dead or stalled rank is noticed sooner."""
        self.timeout_key, self.timeout_s = "dist.timeout_s", seconds
        from torch.distributed.distributed_c10d import _set_pg_timeout
        if self.active and self.owned:  # the caller's group keeps the caller's timeout
            _set_pg_timeout(datetime.timedelta(seconds=seconds), None)
        if self.control is not None:
            _set_pg_timeout(datetime.timedelta(seconds=seconds), self.control)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks in place. Call on all ranks."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank. Call on all ranks."""
        return self.min_later([0 if flag else 1])()[0] == 0

    def min_later(self, values: list[int]) -> Callable[[], list[int]]:
        """Start an element-wise minimum of a few ints over ranks in the background, on the gloo control group
        (no device sync); the returned function waits for it and gives the minima. Call on all ranks."""
        return self._later(values, dist.ReduceOp.MIN)

    def sum_later(self, values: list[int]) -> Callable[[], list[int]]:
        """min_later's sum."""
        return self._later(values, dist.ReduceOp.SUM)

    def _later(self, values: list[int], op) -> Callable[[], list[int]]:
        if not self.active:
            return lambda: list(values)
        t = torch.tensor(values, dtype=torch.int64)
        work = dist.all_reduce(t, op=op, group=self.control, async_op=True)

        def answer() -> list[int]:
            work.wait()
            return t.tolist()
        return answer

    def first_error(self, error: str | None) -> str | None:
        """The first rank's error (by rank) on every rank, or None if no rank had one: one small all-reduce,
        and the message sent only when there is one (this runs at every checkpoint). Call on all ranks."""
        if not self.active:
            return error
        first = self.min_later([self.env.rank if error else self.env.world_size])()[0]
        if first == self.env.world_size:
            return None
        box = [error]
        dist.broadcast_object_list(box, src=first, group=self.control)
        return box[0]

    def broadcast_object(self, obj, after_rank0_alone: bool = False, src: int = 0):
        """Rank `src`'s (by default rank 0's) `obj` on every rank. Call on all ranks; others pass anything.

        `after_rank0_alone`: the other ranks wait while rank 0 works alone (its solo evaluation), up to
        `val.rank0_timeout_s`; every other wait ends after `dist.timeout_s`.
        """
        if not self.active:
            return obj
        box = [obj]
        if not after_rank0_alone:
            dist.broadcast_object_list(box, src=src, group=self.control)
            return box[0]
        key, seconds = self.timeout_key, self.timeout_s
        self.timeout_key, self.timeout_s = "val.rank0_timeout_s", self.rank0_timeout_s
        dist.broadcast_object_list(box, src=0, group=self.patient)
        self.timeout_key, self.timeout_s = key, seconds
        return box[0]

    def gather_object(self, obj) -> list | None:
        """Every rank's `obj`, as a list on rank 0 (None elsewhere). Call on all ranks."""
        if not self.active:
            return [obj]
        out = [None] * self.env.world_size if self.env.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank's module. Call on all ranks."""
        if self.active:
            broadcast_from_rank0([*module.parameters(), *module.buffers()])

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers into every rank's module. Call on all ranks."""
        if self.active:
            broadcast_from_rank0(list(module.buffers()))

    def barrier(self) -> None:
        """Call on all ranks."""
        if self.active:
            dist.barrier(group=self.control)

    def close(self) -> None:
        """Destroy the process group made here (every group with it), or, in the caller's, only the groups made
        here."""
        if not self.active:
            return
        if self.owned:
            dist.destroy_process_group()
        else:
            for group in self.groups:
                dist.destroy_process_group(group)
        self.groups = []


def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of `tensors` in every rank's, in place, coalesced into few broadcasts on the default group.
    Call on all ranks."""
    if tensors:
        with torch.no_grad():
            dist._broadcast_coalesced(dist.distributed_c10d._get_default_group(), tensors, 250 * 1024 * 1024, 0)
