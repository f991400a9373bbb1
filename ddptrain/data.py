"""Data: a seeded train/val/test split and the per-rank loaders.

Training batches are sharded with DistributedSampler (also at world size 1, so one code path).
Each rank's batch is batch_size / (world_size * grad_accum_steps), and incomplete global batches
are dropped: rank r's batch b is then exactly its slice of global batch b, whatever the world size.
Evaluation uses ShardSampler: disjoint and unpadded, so no sample is counted twice.
A stream (IterableDataset) is split by stream.py instead, and read through torchdata's StatefulDataLoader;
its passes end on all ranks at the same step (`StreamSteps`).
"""
from __future__ import annotations

import itertools
import time
import warnings
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler, Subset

from . import batch
from . import stream as stream_mod
from .config import DataConfig, ConfigError
from .dist import DistEnv
from .state import OwnRng, from_saved, saveable, seed_everything


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


def _loader_kwargs(cfg: DataConfig, pin: bool, collate: Callable | None) -> dict:
    kw = {"num_workers": cfg.num_workers, "pin_memory": pin,
          "collate_fn": collate or batch.collate}
    if cfg.num_workers > 0:
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


def stream_length(stream: IterableDataset) -> int | None:
    """The samples in one pass of a stream, when it says (`__len__`), else None."""
    try:
        return len(stream)
    except TypeError:
        return None


class Steps:
    """The micro-batches of a map-style epoch in whole optimizer steps of k: lists of k; `count` steps."""

    def __init__(self, batches: Iterable, k: int, count: int | None = None):
        self.batches, self.k, self.count = batches, k, count

    def __iter__(self) -> Iterator[list]:
        it = iter(self.batches)
        while step := list(itertools.islice(it, self.k)):
            yield step

    def read_ahead(self) -> None:
        """Called between a step's backward and its optimizer step; a stream reads its next step there."""
        self.count -= 1

    def ends_pass(self) -> bool:
        """The step just taken (after its read_ahead) is the pass's last."""
        return self.count == 0

    def settle(self) -> None:
        """Called when the loop leaves the epoch, done or early: the batches' source is closed, so that the
        loader's workers are shut down now, not in a later garbage collection, where torch's loader waits 5 s
        for each of them."""
        close = getattr(self.batches, "close", None)  # a generator's
        if close is not None:
            close()


WINDOW_S = 0.05  # a stream reads ahead about this much training time at once, and agrees once on all of it
MAX_WINDOW = 64  # steps


class StreamSteps(Steps):
    """A stream's micro-batches in whole steps, for as long as every rank has a whole step: a pass that ends
    on one rank ends on all at the same step, before any of them enters that step's gradient all-reduce.

    Steps are read in windows: right after the backward of a window's last step, every rank reads the next
    window's steps and starts, in the background on the gloo control group, a minimum over ranks of the
    whole steps it got; the loop waits for it only before the next step. Fewer than asked on any rank: those
    many are trained on every rank, and the pass is over. The window grows to about WINDOW_S of training
    (the same on every rank: the next window's size rides in the same all-reduce), so the agreement costs
    one small all-reduce per window, not per step.

    The reads draw from an RNG of their own (`StreamPosition.rng`), so how far ahead the loop reads never
    changes the training's random numbers, and a checkpoint (`StreamPosition`) can restart a window anywhere.
    """

    def __init__(self, batches: Iterable, k: int, dist, position: "StreamPosition", left: int | None):
        """`left`: the steps the run has left, if known (no window reads past them)."""
        super().__init__(batches, k)
        self.dist, self.position, self.left = dist, position, left
        self.size, self.window, self.agreement = 1, [], None
        self.whole, self.last_window, self.since, self.window_done = 0, False, None, False

    def __iter__(self) -> Iterator[list]:
        with self.position.rng:
            self.it = iter(self.batches)
            for _ in itertools.islice(self.it, self.position.resumed_steps * self.k):
                pass  # a resumed window: the steps trained before the checkpoint are read again, and skipped
            self.position.resumed_steps = 0
        self._read()
        while self.agreement is not None:
            (self.whole, self.size), self.agreement = self._agreed(), None
            self.last_window = self.whole < self.asked  # a rank had fewer
            yield from self.window[:self.whole]
            if self.last_window:
                break
        self.window = []
        self.position.window = None  # the pass is over: nothing read ahead belongs to it

    def _read(self) -> None:
        """Read the next window and start the agreement on it."""
        now = time.perf_counter()
        proposal = 1
        if self.since is not None:  # the next window: about WINDOW_S of steps as fast as this window's
            step_s = (now - self.since) / max(self.whole, 1)
            proposal = max(1, min(int(WINDOW_S / max(step_s, 1e-9)), 2 * self.size, MAX_WINDOW))
        self.since = now
        self.asked = self.size if self.left is None else min(self.size, self.left)
        with self.position.rng:
            self.position.start_window()
            self.window = []
            while len(self.window) < self.asked and len(step := list(itertools.islice(self.it, self.k))) == self.k:
                self.window.append(step)
        if self.left is not None:
            self.left -= len(self.window)
        self.agreement = self.dist.min_later([len(self.window), proposal])

    def _agreed(self) -> list[int]:
        """The agreement in progress, waited for once: [whole steps on every rank, the next window's size]."""
        if callable(self.agreement):
            self.agreement = self.agreement()
        return self.agreement

    def read_ahead(self) -> None:
        self.position.steps_done += 1
        self.window_done = self.position.steps_done == self.whole
        if self.window_done and not self.last_window and self.left != 0:
            self._read()

    def ends_pass(self) -> bool:
        """The step just taken ends the pass: the last of a window that a rank could not fill, or of one whose
        next (read in read_ahead) has no whole step, which this waits for. Not known where max_steps ends
        the reads."""
        if not self.window_done:
            return False
        return self.last_window or (self.agreement is not None and self._agreed()[0] == 0)

    def settle(self) -> None:
        if self.agreement is not None:  # every rank posted this agreement: finish it, so the next one pairs up
            self._agreed()
            self.agreement = None
        super().settle()


class StreamPosition:
    """This rank's place in the training stream's pass, as a per-rank checkpoint part (None between passes):
    the loader's state at the start of the window in progress (`StreamSteps`), the steps of that window
    already trained (a resumed run reads them again and skips them), and the reads' RNG where a resumed run's
    reads begin: the window's start, or the pass's where torchdata re-reads the pass so far (a stream without
    a state, read in the main process)."""

    def __init__(self, loader, progress, seed: int):
        from torchdata.stateful_dataloader import Stateful
        self.loader, self.progress, self.seed = loader, progress, seed
        self.rereads_pass = loader.num_workers == 0 and not isinstance(loader.dataset, Stateful)
        self.rng = OwnRng()
        self.pass_rng: dict | None = None  # the reads' RNG at the start of the pass
        self.window: tuple[dict, dict] | None = None  # (loader state, reads' RNG) at the window's start
        self.steps_done = 0  # steps of the window trained
        self.resumed_steps = 0  # steps to skip at the start of the resumed pass

    def start_pass(self, epoch: int) -> None:
        if self.window is None:  # not resumed mid-pass: a fresh pass, fresh reads' RNG
            self.rng.seed(self.seed + epoch)
            self.pass_rng, self.resumed_steps = self.rng.state, 0

    def start_window(self) -> None:
        """Called inside `with self.rng`, before the window's reads (so `self.rng.state` is the reads' RNG now)."""
        self.window, self.steps_done = (self.loader.state_dict(), self.rng.state), 0

    def state_dict(self) -> dict | None:
        if self.progress.pass_ended or self.window is None:
            return None
        loader_state, rng = self.window
        return {"loader": loader_state, "rng": saveable(self.pass_rng if self.rereads_pass else rng),
                "steps_done": self.steps_done, "workers": self.loader.num_workers}

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None and state.get("workers", self.loader.num_workers) != self.loader.num_workers:
            if self.loader.dataset.rank == 0:
                from .runlog import warn
                warn(f"the checkpoint was made with data.num_workers={state['workers']}: a stream's place in a pass "
                     f"cannot move to another number of workers (its parts are others), so pass "
                     f"{self.progress.epoch} starts again from its beginning")
            return
        if state is not None and not self.progress.pass_ended:
            self.loader.load_state_dict(state["loader"])
            self.rng.state = self.pass_rng = from_saved(state["rng"])
            self.resumed_steps, self.window = state["steps_done"], (state["loader"], self.rng.state)

    def load_other_world_size(self, states: list, rank: int) -> None:
        if any(s is not None for s in states) and not self.progress.pass_ended and rank == 0:
            from .runlog import warn
            warn(f"the checkpoint was made on {len(states)} ranks: a stream's place in a pass cannot move to another "
                 f"world size, so pass {self.progress.epoch} starts again from its beginning")


def eval_loader(dataset: Dataset, cfg: DataConfig, rank: int, world_size: int, pin: bool,
                collate: Callable | None = None) -> DataLoader:
    if stream_mod.is_stream(dataset):  # every part's every sample, the last batches incomplete
        part = stream_mod.rank_stream(dataset, rank, world_size, split=cfg.stream_sharding == "auto")
        return DataLoader(part, batch_size=cfg.eval_batch_size, **_loader_kwargs(cfg, pin, collate))
    return DataLoader(dataset, batch_size=cfg.eval_batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                      **_loader_kwargs(cfg, pin, collate))
