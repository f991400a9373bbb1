"""One run at a time in a run directory: rank 0 holds an exclusive lock on `<runs_dir>/.<name>.lock` for the
whole run.

The lock is `flock`, so the kernel releases it when its holder dies (SIGKILL, OOM, a node lost): a
requeued job or an elastic restart takes it back without help. The file records the holder (host, pid,
SLURM job, start time) for the message a second run gets; a run that ends cleanly empties it, so a record
found in a free lock is that of a run that died, and taking it over says so.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .runlog import warn


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('since')}"


class RunLock:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir.parent / f".{run_dir.name}.lock"  # beside the run directory, which stays as it was
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; None, or (if another live process holds it) a description of the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            return _describe(holder) if holder else "another process"
        previous = self._read(fd)
        if previous:
            warn(f"run directory '{self.run_dir}': taking over the lock of a run that ended without "
                 f"releasing it ({_describe(previous)})")
        job = os.environ.get("SLURM_ARRAY_JOB_ID") and \
            f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
        me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": job or os.environ.get("SLURM_JOB_ID"),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return None

    @staticmethod
    def _read(fd: int) -> dict | None:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "null")
        except ValueError:
            return None

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None
