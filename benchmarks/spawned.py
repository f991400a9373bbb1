"""Run a benchmark function on local ranks started with `spawn` (gloo over localhost): every rank gets
torchrun's variables and one thread, and rank 0's return value comes back."""
from __future__ import annotations

import multiprocessing as mp
import os
import socket


def _rank(target, rank: int, world_size: int, port: int, args: tuple, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    torch.set_num_threads(1)
    try:
        result = target(*args)
    except BaseException:
        import traceback
        queue.put(("failed", f"rank {rank}: {traceback.format_exc()}"))  # the caller must not wait for rank 0
        raise
    if rank == 0:
        queue.put(("ok", result))


def on_ranks(target, *args, world_size: int = 2, timeout: float = 900):
    """target(*args) on `world_size` spawned ranks; rank 0's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(target, r, world_size, port, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    import queue as queues
    import time
    deadline = time.monotonic() + timeout
    while True:  # rank 0's result, or the first failure; not a wait forever on ranks that died without a word
        try:
            outcome, result = queue.get(timeout=1)
            break
        except queues.Empty:
            if not any(p.is_alive() for p in procs) or time.monotonic() > deadline:
                outcome, result = "failed", f"the ranks exited or ran past {timeout} s without a result"
                break
    for p in procs:
        if outcome != "ok":
            p.terminate()
        p.join(120)
    if outcome != "ok":
        raise RuntimeError(result)
    return result
