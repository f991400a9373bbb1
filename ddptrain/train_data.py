"""The training data on this rank: its loader (a dataset through the resumable sampler, or a stream), the
run's length in optimizer steps, and each epoch's whole steps from where the run is, with the wait for each
batch timed. (The loaders are data.py's, `Steps` steps.py's.)
"""
from __future__ import annotations

import itertools
import time

from . import config as config_mod
from . import observe
from .config import Config
from .data import shut_down, stream_length, stream_train_loader, train_loader
from .dist import Dist
from .state import Progress, rank_seed
from .steps import Steps, StreamPosition, StreamSteps
from .stream import is_stream
from .task import Task, user_error


def planned_steps(tc: config_mod.TrainConfig, steps_per_epoch: int | None) -> int | None:
    """The run's optimizer steps: epochs x steps per epoch, at most train.max_steps; None when unknown (a stream
    without a length, and no max_steps)."""
    if steps_per_epoch is None:
        return tc.max_steps
    return min(tc.epochs * steps_per_epoch, tc.max_steps or tc.epochs * steps_per_epoch)


def _timed(iterable, rates: observe.Rates):
    """Yield from iterable, adding the time spent waiting for each item to the log interval's wait for data; a
    failure of the user's dataset is a TaskError that names it."""
    it = iter(iterable)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise user_error(e, "the training data") from e
        rates.data_wait_s += time.perf_counter() - t
        yield item


class TrainData:
    """The training loader, its steps per epoch (None: a stream that does not say its length) and, for a
    stream, its position (checkpointed per rank)."""

    def __init__(self, task: Task, cfg: Config, dist: Dist, progress: Progress, pin: bool):
        env, tc = dist.env, cfg.train
        self.dist, self.seed, self.k = dist, cfg.seed, tc.grad_accum_steps
        self.stream, self.position = is_stream(task.train), None
        if self.stream:  # an epoch is one pass, as long as the stream lasts; its length only when it says
            self.loader, self.sampler = stream_train_loader(task.train, cfg.data, env, tc.grad_accum_steps, pin,
                                                            task.collate), None
            length = stream_length(task.train)
            self.steps_per_epoch = None if length is None else length // cfg.data.batch_size
            # the reads' own RNG (StreamSteps), seeded per rank and pass far from the training's (rank seed + step)
            self.position = StreamPosition(self.loader, progress, rank_seed(cfg.seed, env.rank) + 2**40)
        else:
            self.loader, self.sampler = train_loader(task.train, cfg.data, env, tc.grad_accum_steps, cfg.seed, pin,
                                                     task.collate)
            self.steps_per_epoch = self.sampler.num_samples // self.loader.batch_size // tc.grad_accum_steps

    def epoch(self, epoch: int, step_in_epoch: int, steps_left: int | None, rates: observe.Rates) -> Steps:
        """`epoch`'s whole steps from its step `step_in_epoch` on; a stream's, at most `steps_left` (the run's)."""
        k = self.k
        self.loader.generator.manual_seed(rank_seed(self.seed, self.dist.env.rank) + epoch)
        if self.stream:  # the pass ends where the first rank's part of the stream does
            self.position.start_pass(epoch)
            return StreamSteps(_timed(self.loader, rates), k, self.dist, self.position, steps_left)
        self.sampler.set_epoch(epoch)
        self.sampler.start = step_in_epoch * k * self.loader.batch_size
        left = (self.steps_per_epoch - step_in_epoch) * k
        return Steps(_timed(itertools.islice(self.loader, left), rates), k, left // k)

    def close(self) -> None:
        """The loader's workers stopped (at the run's end, or on its way out)."""
        shut_down(self.loader)
