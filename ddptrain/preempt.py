"""Preemption: a signal only sets a flag; at a step boundary all ranks agree and checkpoint together.

Work inside a signal handler can land in the middle of a backward pass or a collective (Lightning
#21406), so the handler records the signal and nothing else. `poll()`, called at every step by every
rank, all-reduces the flags asynchronously over the gloo control group and reads the result at the
next poll: no rank waits on it, and all ranks see the same answer at the same step.

An all-reduce costs about a millisecond of CPU on gloo, a third of a small model's step, so the ranks
poll about every POLL_INTERVAL_S rather than every step. The interval in steps is rank 0's and
travels in the same all-reduce, so every rank keeps the same schedule without another collective.
"""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from .dist import Dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; the SLURM scripts requeue on it
POLL_INTERVAL_S = 0.25  # a signal is acted on within about two intervals, far inside any grace time
MAX_POLL_STEPS = 100


class Preempted(Exception):
    """Raised on every rank after the preemption checkpoint is written."""


class Preemption:
    def __init__(self, signal_names: list[str], dist_: Dist):
        self.dist, self.active = dist_, dist_.active  # made once the process group exists, and used while it does
        self.received: int | None = None
        self._work = None
        self._flag = torch.zeros(2, dtype=torch.int64)  # [signal received, rank 0's next interval in steps]
        self._every, self._steps, self._since = 1, 0, time.perf_counter()
        self._previous = {}
        for name in signal_names:
            sig = getattr(signal, name)
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook runner): no handlers, no preemption
                break

    def _handler(self, signum, frame):
        self.received = signum

    def poll(self) -> bool:
        """True on every rank, at the same step, once any rank has received a signal. Call on all ranks."""
        if not self.active:
            return self.received is not None
        self._steps += 1
        if self._steps < self._every:
            return False
        agreed = False
        if self._work is not None:
            self._work.wait()
            agreed, self._every = bool(self._flag[0]), int(self._flag[1])
        now = time.perf_counter()
        proposal = 0
        if self.dist.env.is_main:  # the others send 0, so the maximum is rank 0's proposal
            step_s = (now - self._since) / self._steps
            proposal = max(1, min(int(POLL_INTERVAL_S / max(step_s, 1e-9)), 2 * self._every, MAX_POLL_STEPS))
        self._steps, self._since = 0, now
        self._flag = torch.tensor([0 if self.received is None else 1, proposal], dtype=torch.int64)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.dist.control, async_op=True)
        return agreed

    def close(self, wait: bool = True) -> None:
        """Restore the previous handlers; with wait, finish the pending reduction first (call on all ranks)."""
        if wait and self._work is not None:
            self._work.wait()
        self._work = None
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another rank"
