"""Data: a seeded train/val/test split and the per-rank loaders.

Training batches are sharded with DistributedSampler (also at world size 1, so one code path).
Each rank's batch is batch_size / (world_size * grad_accum_steps), and incomplete global batches
are dropped: rank r's batch b is then exactly its slice of global batch b, whatever the world size.
Evaluation uses ShardSampler: disjoint and unpadded, so no sample is counted twice.
A stream (IterableDataset) is split by stream.py instead, and read through torchdata's StatefulDataLoader;
its passes end on all ranks at the same step (steps.py).
"""
from __future__ import annotations

import itertools
import signal
import warnings
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler, Subset

from . import batch
from . import stream as stream_mod
from .config import DataConfig, ConfigError
from .dist import DistEnv
from .state import seed_everything


def split(dataset: Dataset, fractions: Sequence[float], seed: int) -> list[Subset]:
    """Split into len(fractions) + 1 subsets: the remainder first (train), then one per fraction."""
    n = len(dataset)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    sizes = split_sizes(fractions, n)
    first = n - sum(sizes)
    parts, start = [perm[:first]], first
    for size in sizes:
        parts.append(perm[start:start + size])
        start += size
    return [Subset(dataset, p) for p in parts]


def split_sizes(fractions: Sequence[float], n: int) -> list[int]:
    """The samples of each set that `split` cuts off n samples by these fractions."""
    return [int(round(f * n)) for f in fractions]


def check_fractions(data: DataConfig, n: int, sizes: Sequence[int] | None = None) -> None:
    """Refuse a data.val_fraction or data.test_fraction above 0 whose set holds no sample: 0 means no such set.
    `sizes` are the (val, test) sets' sample counts, by default those `split` gives them out of n samples."""
    keys = ("val_fraction", "test_fraction")
    sizes = split_sizes([getattr(data, key) for key in keys], n) if sizes is None else sizes
    for key, size in zip(keys, sizes):
        fraction = getattr(data, key)
        if fraction > 0 and size == 0:
            raise ConfigError(f"config key 'data.{key}': {fraction} of the {n} samples is none of them; "
                              f"expected 0 (no such set) or a share of at least one sample")


class ShardSampler(Sampler[int]):
    """Rank r gets indices r, r + world_size, ...: disjoint across ranks and never padded."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


class _Seeded(int):
    """The first index of a batch, carrying the seed of the random streams that batch is loaded with."""

    def __new__(cls, index: int, seed: int):
        self = super().__new__(cls, index)
        self.seed = seed
        return self

    def __reduce__(self):  # to the worker
        return _Seeded, (int(self), self.seed)


class SeededBatches(Dataset):
    """A map-style dataset read by DataLoader workers: each batch draws its random numbers (augmentation) from
    streams seeded by its place in the epoch, not from its worker's, whose position depends on what that worker
    loaded before (other epochs, with persistent workers; batches that a resumed run skips). So a run resumed
    mid-epoch loads the same batches as one that never stopped."""

    def __init__(self, inner: Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index):
        return self.inner[int(index)]

    def __getitems__(self, indices: list) -> list:
        if hasattr(indices[0], "seed"):
            seed_everything(indices[0].seed)
        indices = [int(i) for i in indices]
        getitems = getattr(self.inner, "__getitems__", None)
        return getitems(indices) if getitems is not None else [self.inner[i] for i in indices]


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way: `start` of this rank's indices are skipped.

    Resuming mid-epoch then costs nothing: the skipped samples are never loaded. With `seed_batches` (the
    batch size), the first index of each batch carries its seed (`SeededBatches`).
    """

    start, seed_batches = 0, None

    def __iter__(self) -> Iterator[int]:
        indices = itertools.islice(super().__iter__(), self.start, None)
        if self.seed_batches is None:
            return indices
        b, base = self.seed_batches, (self.seed * 1_000_003 + self.rank) * 1_000_003 + self.epoch
        return (_Seeded(i, (base * 1_000_003 + n) % 2**63) if n % b == 0 else i
                for n, i in enumerate(indices, self.start))

    def __len__(self) -> int:
        return self.num_samples - self.start


def micro_batch_size(cfg: DataConfig, world_size: int, grad_accum_steps: int) -> int:
    parts = world_size * grad_accum_steps
    if cfg.batch_size % parts:
        raise ConfigError(
            f"config key 'data.batch_size': {cfg.batch_size} must be divisible by world_size * "
            f"train.grad_accum_steps = {world_size} * {grad_accum_steps} = {parts}")
    return cfg.batch_size // parts


def check_batch_size(dataset: Dataset, cfg: DataConfig) -> None:
    if stream_mod.is_stream(dataset):
        return  # known only when read: a pass without one whole step is an error then (trainer.py)
    if len(dataset) < cfg.batch_size:
        raise ConfigError(f"config key 'data.batch_size': {cfg.batch_size} is larger than the training set "
                          f"({len(dataset)} samples)")


def pinned(cfg: DataConfig, device: torch.device, cpu_batches: bool) -> bool:
    """Whether the loaders pin their batches (for non-blocking copies): data.pin_memory, on CUDA, for batches of
    CPU tensors (a dataset that makes CUDA tensors itself has nothing to pin)."""
    return cfg.pin_memory and device.type == "cuda" and cpu_batches


# The signals that stop or preempt a run (preempt.signals may name these) are the rank's to act on, not its
# DataLoader workers': torchrun sends them to each rank's process group and SLURM to every process of the job
# step, workers included, and torch's worker dies of a SIGTERM that its parent did not send, which the rank then
# takes for a failure of the data (no preemption checkpoint). A worker ends when its rank stops it, or on its own
# once the rank is gone; torchrun's and SLURM's SIGKILL still end it.
WORKERS_IGNORE = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _worker_start(worker_id: int) -> None:
    """A DataLoader worker's start (after torch has set its own handlers): the signals above ignored, and a
    SIGTERM obeyed only from the parent, as torch's worker does, since the parent's multiprocessing stops
    its workers with one at exit. The sender is known only to a thread that waits for the signal."""
    for sig in WORKERS_IGNORE:
        signal.signal(sig, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not on Linux: torch's handler stays
        return
    import os
    import threading
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # pending for the thread, in every thread

    def wait_for_the_parent(parent: int) -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)
    threading.Thread(target=wait_for_the_parent, args=(os.getppid(),), daemon=True,
                     name="ddptrain-worker-sigterm").start()


def _loader_kwargs(cfg: DataConfig, pin: bool, collate: Callable | None) -> dict:
    kw = {"num_workers": cfg.num_workers, "pin_memory": pin,
          "collate_fn": collate or batch.collate}
    if cfg.num_workers > 0:
        kw["worker_init_fn"] = _worker_start  # runs after torch's own signal handlers are set
        kw["persistent_workers"] = cfg.persistent_workers
        if cfg.prefetch_factor is not None:
            kw["prefetch_factor"] = cfg.prefetch_factor
    return kw


def train_loader(dataset: Dataset, cfg: DataConfig, env: DistEnv, grad_accum_steps: int, seed: int,
                 pin: bool, collate: Callable | None = None) -> tuple[DataLoader, ResumableSampler]:
    per_rank = micro_batch_size(cfg, env.world_size, grad_accum_steps)
    check_batch_size(dataset, cfg)
    sampler = ResumableSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                               seed=seed, drop_last=True)
    if cfg.num_workers > 0:  # in the main process (no workers) the training's own RNG, checkpointed, is drawn from
        sampler.seed_batches, dataset = per_rank, SeededBatches(dataset)
    # The loader draws its workers' base seed from its own generator (re-seeded every epoch by the
    # loop), not from the global RNG, whose state a checkpoint restores exactly.
    loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, drop_last=True,
                        generator=torch.Generator(), **_loader_kwargs(cfg, pin, collate))
    return loader, sampler


def stream_train_loader(stream: IterableDataset, cfg: DataConfig, env: DistEnv, grad_accum_steps: int,
                        pin: bool, collate: Callable | None = None):
    """This rank's part of a training stream, in micro-batches, through a StatefulDataLoader (its state is
    this rank's place in the pass); the incomplete last batch of each worker is dropped.

    Its workers start anew every pass, whatever data.persistent_workers says: a kept worker's random streams
    would go on from the previous pass, which no checkpoint holds (the loader's state has the base seed its
    workers started from), so a run resumed in a later pass would draw other random numbers."""
    from torchdata.stateful_dataloader import StatefulDataLoader
    part = stream_mod.rank_stream(stream, env.rank, env.world_size, split=cfg.stream_sharding == "auto")
    kwargs = _loader_kwargs(cfg, pin, collate)
    if cfg.num_workers > 0:
        kwargs["persistent_workers"] = False
    with warnings.catch_warnings():  # torchdata 0.11 calls an API that torch >= 2.9 deprecates; nothing for the user to do
        warnings.filterwarnings("ignore", message=".*'set_vital' is deprecated")
        return StatefulDataLoader(part, batch_size=micro_batch_size(cfg, env.world_size, grad_accum_steps),
                                  drop_last=True, generator=torch.Generator(), **kwargs)


def shut_down(loader: DataLoader) -> None:
    """Stop the worker processes that a loader with persistent workers keeps between epochs, now. Left to the
    garbage collection of the run's objects, the loader's queues can go first, so its workers never hear that
    they are done: torch waits 5 s for each and then kills it (as Lightning, through the loader's iterator)."""
    iterator, loader._iterator = getattr(loader, "_iterator", None), None
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def stream_length(stream: IterableDataset) -> int | None:
    """The samples in one pass of a stream, when it says (`__len__`), else None."""
    try:
        return len(stream)
    except TypeError:
        return None


def eval_loader(dataset: Dataset, cfg: DataConfig, rank: int, world_size: int, pin: bool,
                collate: Callable | None = None) -> DataLoader:
    if stream_mod.is_stream(dataset):  # every part's every sample, the last batches incomplete
        part = stream_mod.rank_stream(dataset, rank, world_size, split=cfg.stream_sharding == "auto")
        return DataLoader(part, batch_size=cfg.eval_batch_size, **_loader_kwargs(cfg, pin, collate))
    return DataLoader(dataset, batch_size=cfg.eval_batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                      **_loader_kwargs(cfg, pin, collate))
