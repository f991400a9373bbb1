"""Streams: a `torch.utils.data.IterableDataset` as training, validation or test data.

A stream is split over ranks and over each rank's DataLoader workers, so that in one pass every item is
read by exactly one worker of one rank. Part `index` of `count` (count = world size x workers per rank,
index = rank x workers + worker id) keeps:
- with `data.stream_sharding: auto` (the default), the items the stream's own `ddptrain.shard(...)` gives
  it (typically a list of files, split before any is opened) or, when the stream does not call it, every
  count-th item from position `index` (every part then reads the whole stream, and keeps its share);
- with `data.stream_sharding: dataset`, everything: the stream splits itself (Hugging Face
  `split_dataset_by_node`, webdataset's `split_by_node`/`split_by_worker`, RANK and WORLD_SIZE).

Training reads a stream through torchdata's `StatefulDataLoader`, whose state is checkpointed per rank: a
stream with `state_dict()`/`load_state_dict()` continues from where it was; one without is re-read and
the batches already trained are skipped (torchdata's fast-forward: exact, at the cost of reading them).
"""
from __future__ import annotations

import itertools
from typing import Iterable, Iterator

from torch.utils.data import IterableDataset, get_worker_info


class _Context:
    """The rank part that the stream being iterated belongs to, and whether it called `shard`."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size, self.sharded = rank, world_size, False


_current: _Context | None = None  # set while a RankStream starts its stream (in the process that reads it)


def part() -> tuple[int, int]:
    """(index, count): which part of the stream this rank's this DataLoader worker reads."""
    rank, world = (_current.rank, _current.world_size) if _current is not None else (0, 1)
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return rank * workers + worker, world * workers


def shard(iterable: Iterable) -> Iterator:
    """This rank's this worker's share of `iterable`: items index, index + count, ... (see `part`).

    Call it in a stream's `__iter__` on what is cheap to split (its files, its shards) before reading
    them; ddptrain then does not split the stream's items again. Outside ddptrain it splits over
    DataLoader workers only.
    """
    if _current is not None:
        _current.sharded = True
    index, count = part()
    return itertools.islice(iterable, index, None, count)


def is_stream(dataset) -> bool:
    return isinstance(dataset, IterableDataset)


def has_state(dataset) -> bool:
    return callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))


class RankStream(IterableDataset):
    """The part of `stream` that belongs to `rank` of `world_size` (and, in a worker, to that worker)."""

    def __init__(self, stream: IterableDataset, rank: int, world_size: int, split: bool = True):
        self.stream, self.rank, self.world_size, self.split = stream, rank, world_size, split
        self.position = 0  # items of the stream read in this pass (before this part's filter)

    def __iter__(self) -> Iterator:
        return self._items(0)

    def _items(self, start: int) -> Iterator:
        global _current
        context = _Context(self.rank, self.world_size)
        previous, _current = _current, context
        try:  # a stream calls shard() in __iter__ or when its generator starts: both happen here
            index, count = part()
            items = iter(self.stream)
            first = next(items, _END)
        finally:
            _current = previous
        if first is _END:
            return
        keep_all = context.sharded or not self.split or count == 1
        for position, item in enumerate(itertools.chain((first,), items), start=start):
            self.position = position + 1
            if keep_all or position % count == index:
                yield item


class StatefulRankStream(RankStream):
    """A RankStream over a stream with state: its position is the stream's state plus the item count."""

    def __init__(self, stream, rank, world_size, split=True):
        super().__init__(stream, rank, world_size, split)
        self._resume: dict | None = None

    def __iter__(self) -> Iterator:
        start = 0
        if self._resume is not None:
            self.stream.load_state_dict(self._resume["stream"])
            start, self._resume = self._resume["position"], None
        self.position = start
        return self._items(start)

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state


_END = object()


def rank_stream(stream: IterableDataset, rank: int, world_size: int, split: bool = True) -> RankStream:
    """The stream's part for this rank; stateful (cheap exact resume) when the stream has a state."""
    cls = StatefulRankStream if has_state(stream) else RankStream
    return cls(stream, rank, world_size, split)
