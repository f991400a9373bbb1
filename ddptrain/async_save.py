"""Checkpoints written in the background (`checkpoint.async_save`): the training state is copied to CPU memory
and written on a thread while training goes on; at most one write is in flight.

The copies go into buffers kept from one save to the next (DCP's stagers, which cache a CPU copy per tensor
storage; pinned on CUDA): a fresh 400 MB copy costs this machine 0.14-1.1 s of page faults, a copy into the
kept buffers 0.06 s. The copy is made after the run's first step, in the background (`prepare`), so the
run holds one copy of its state in CPU memory from then on. torch 2.11's `DefaultStager` frees its copies
after every stage (`keeps_buffers`): there each `dcp.async_save` copies the shards afresh.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable

import torch

from .checkpoint import CheckpointError, first_line


def updated_in_place(module: torch.nn.Module, optimizer) -> Callable[[torch.Tensor], bool]:
    """Whether a tensor is (a view of) one of the parameters or the optimizer's state: what only an optimizer
    step changes, so that a background copy of them may run during the next step's forward and backward."""
    def storage(t: torch.Tensor) -> int:
        return (t.to_local() if hasattr(t, "to_local") else t).untyped_storage().data_ptr()
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    live = {storage(t) for t in [*module.parameters(), *state] if t.numel()}
    return lambda t: t.numel() > 0 and storage(t) in live


def _dcp_stager(pin: bool):
    """DCP's stager for `dcp.async_save`: it copies on a thread of its own (ordered on a CUDA stream)."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    return DefaultStager(StagingOptions(use_pinned_memory=pin, use_shared_memory=False, use_async_staging=True,
                                        use_non_blocking_copy=pin))


def _copier(pin: bool):
    """The engine under DCP's stagers, for ddptrain's own copies: synchronous, in the caller or on the writer's
    thread. Used directly because torch 2.11's `DefaultStager` around it frees its copies after every stage."""
    from torch.distributed.checkpoint._state_dict_stager import StateDictStager
    return StateDictStager(pin_memory=pin, share_memory=False)


@functools.cache
def keeps_buffers() -> bool:
    """Whether DCP's `DefaultStager` keeps its CPU copies from one stage to the next and may be used again: in
    torch 2.10 and 2.13; 2.11's frees them after every stage, and a second stage of a DTensor then fails."""
    stager, t = _dcp_stager(pin=False), torch.zeros(1)
    try:
        first = stager.stage(t).result()
        second = stager.stage(t).result()  # with the first still alive, so that its memory cannot be reused
        return first.data_ptr() == second.data_ptr()
    except Exception:
        return False
    finally:
        stager.close()


class Background:
    """At most one checkpoint write in flight, on a thread of its own; a failure is raised by the next `wait`
    (and the checkpoint it was writing never gets its marker, so it is never taken as valid).

    The thread first finishes copying the state (`stage`, the parameters and optimizer state, which the
    next step's forward and backward only read) and then writes it; `staged()` waits for the copy alone,
    before the next optimizer step changes them. `pin`: the copies go to pinned memory (training on CUDA)."""

    def __init__(self, pin: bool = False):
        self.pin = pin
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.staging: Callable[[], None] | None = None  # waits until the state in flight is copied
        self.copier = _copier(pin)  # ddptrain's copies, in the caller or on the thread
        self.dcp = None  # DCP's own stager, copying the shards on its staging thread (`dcp_stager`)

    def copy(self, obj, keep: Callable[[torch.Tensor], bool] = lambda t: False):
        """`obj` with its tensors copied to CPU memory (what the write may hold while training changes the
        originals), but for those that `keep(tensor)` keeps as they are, for a later copy. It first waits
        for the write in flight, whose buffers the copies reuse."""
        self.wait()
        return self._copied(obj, keep)

    def _copied(self, obj, keep: Callable[[torch.Tensor], bool]):
        if isinstance(obj, torch.Tensor):
            return obj if keep(obj) else self.copier.stage(obj.detach())
        if isinstance(obj, dict):  # dict or OrderedDict
            return type(obj)((k, self._copied(v, keep)) for k, v in obj.items())
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            return type(obj)(self._copied(v, keep) for v in obj)
        return obj

    def save(self, state: dict, live: Callable[[torch.Tensor], bool], write: Callable[[dict], None]) -> None:
        """`write(copy of state)` on the thread. What the next forward may change (buffers, running sums) is
        copied now; the tensors `live` names (the parameters and optimizer state, which only the next
        optimizer step changes) on the thread, before the write (`staged` waits for them)."""
        now, copy = self.copy(state, keep=live), {}

        def stage():
            copy["state"] = self._copied(now, keep=lambda t: not live(t))
        self.start(lambda: write(copy["state"]), stage)

    def dcp_stager(self):
        """The stager for `dcp.async_save`, kept for the run so that its copies are reused too (a fresh one
        for each save where torch's cannot be used again; the write before it has ended)."""
        if self.dcp is not None and not keeps_buffers():
            self.dcp.close()
            self.dcp = None
        if self.dcp is None:
            self.dcp = _dcp_stager(self.pin)
        return self.dcp

    def prepare(self, tensors, for_dcp: bool = False) -> None:
        """Make the kept copy of `tensors` ahead of the first save, on a thread (DCP's own with `for_dcp`), so
        that the first save costs what the later ones do. What it copies is thrown away: training goes on
        changing the originals meanwhile (the next save copies them again, after this copy ended). None for
        DCP where its stager cannot keep them."""
        if for_dcp:
            if keeps_buffers():
                self.dcp_stager().stage(tensors)  # a save's staging waits behind it, on the same one thread
        else:
            self.start(lambda: None, lambda: self._copied(tensors, keep=lambda t: False), awaited=False)

    def start(self, write: Callable[[], None], stage: Callable[[], None] = lambda: None, awaited: bool = True) -> None:
        """`stage()` then `write()` on the thread; `staged()` waits for `stage` when `awaited`."""
        self.wait()
        copied = threading.Event()

        def run():
            try:
                try:
                    stage()
                finally:
                    copied.set()
                write()
            except BaseException as e:
                self.error = e
        self.staging = copied.wait if awaited else None
        self.thread = threading.Thread(target=run, name="ddptrain-checkpoint")
        self.thread.start()

    def staged(self) -> None:
        """Until the state in flight is copied (a failure is raised later, by `wait`)."""
        if self.staging is not None:
            self.staging()
            self.staging = None

    def wait(self) -> None:
        """Until the write in flight is done; its failure as a CheckpointError."""
        if self.thread is not None:
            self.thread.join()
            self.thread = self.staging = None
        if self.error is not None:
            error, self.error = self.error, None
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"a background checkpoint write failed ({first_line(error)}); the previous "
                                  f"checkpoint is kept")

    def close(self) -> None:
        """Wait for the write in flight (its failure as a CheckpointError), then free the kept copies."""
        try:
            self.wait()
        finally:
            for stager in (self.copier, self.dcp):
                if stager is not None:
                    stager.close()
            self.dcp = None
