"""Run a function on N real ranks (forked processes, gloo over TCP on localhost) and collect the results.

Each rank gets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so the code under
test detects its place exactly as it would under torchrun. World size 1 runs in a child too, with none
of those variables, as a plain single process. Every call has a timeout: a deadlock fails the test.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  the first DDP() imports it; doing it once here saves ~2 s per rank

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT", "SLURM_PROCID", "SLURM_STEP_ID")


class RankFailed(AssertionError):
    def __init__(self, errors: dict[int, str], exit_after: dict[int, float]):
        self.errors, self.exit_after = errors, exit_after
        super().__init__("\n".join(f"[rank {r}] {e}" for r, e in sorted(errors.items())))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, out, args):
    for var in RANK_VARS:
        os.environ.pop(var, None)
    if world_size > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = {"ok": True, "result": fn(rank, *args)}
        code = 0
    except BaseException as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        code = 1
    torch.save(result, out / f"rank{rank}.pt")
    os._exit(code)  # skip the parent's (pytest's) atexit handlers inherited through fork


def run_ranks(fn, world_size: int, *args, timeout: float = 60.0) -> list:
    """fn(rank, *args) on every rank; return the results by rank, or raise RankFailed with each rank's error."""
    ctx = mp.get_context("fork")
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, out, args)) for r in range(world_size)]
        for p in procs:
            p.start()
        start = time.monotonic()
        exit_after = {}  # rank -> seconds from start to its exit
        while len(exit_after) < world_size and time.monotonic() - start < timeout:
            for r, p in enumerate(procs):
                if r not in exit_after and not p.is_alive():
                    exit_after[r] = time.monotonic() - start
            time.sleep(0.05)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise AssertionError(f"ranks {hung} still running after {timeout} s: deadlock or hang")
        results, errors = [], {}
        for r, p in enumerate(procs):
            f = out / f"rank{r}.pt"
            if not f.exists():
                errors[r] = f"died with exit code {p.exitcode} before reporting"
                continue
            res = torch.load(f, weights_only=True)
            if res["ok"]:
                results.append(res["result"])
            else:
                errors[r] = res["error"] + "\n" + res["traceback"]
        if errors:
            raise RankFailed(errors, exit_after)
        return results
