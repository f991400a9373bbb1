"""A pass's micro-batches in whole optimizer steps of k: `Steps` for a map-style epoch (its length known),
`StreamSteps` for a stream (how many whole steps every rank has, agreed in windows read ahead), and
`StreamPosition`, a stream's place in its pass as a per-rank checkpoint part.
"""
from __future__ import annotations

import itertools
import time
from typing import Iterable, Iterator

from .state import OwnRng, from_saved, saveable


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
