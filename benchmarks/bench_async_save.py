"""How long training stalls for a checkpoint, written synchronously and in the background (checkpoint.async_save).

Workload: an MLP of 8 layers 2048 wide (33.6M parameters), AdamW: about 400 MB of training state (parameters
and the two moments, fp32). It trains 8 steps with a checkpoint every 2; the stall of a save is the time
the loop spends in `Training.save_checkpoint` (the whole write when synchronous; the copy to CPU memory
and the hand-over when asynchronous). Under ddp it runs in one process (a whole copy), under fsdp on 2
spawned ranks (each rank writes its half). The medians of the saves of each run are reported.

Run from the repository root:  .venv/bin/python benchmarks/bench_async_save.py
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from spawned import on_ranks

HERE = Path(__file__).resolve().parent
WIDTH, LAYERS = 2048, 8


def task(cfg):
    import ddptrain
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, WIDTH, generator=g), torch.randint(0, 10, (256,), generator=g))
    layers = [m for _ in range(LAYERS) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())]
    return ddptrain.Task(model=nn.Sequential(*layers, nn.Linear(WIDTH, 10)), train=data)


def train(strategy: str, async_save: bool, runs: str) -> dict:
    from ddptrain import trainer
    from ddptrain.config import from_dict
    from ddptrain.dist import detect
    stalls = []
    save = trainer.Training.save_checkpoint

    def timed(self):
        t = time.perf_counter()
        save(self)
        stalls.append(time.perf_counter() - t)
    trainer.Training.save_checkpoint = timed
    cfg = from_dict({"name": f"{strategy}-{async_save}", "runs_dir": runs, "loss": {"name": "cross_entropy"},
                     "optim": {"name": "adamw", "lr": 1e-4}, "data": {"batch_size": 16},
                     "train": {"epochs": 1, "max_steps": 8, "log_every": 100},
                     "dist": {"strategy": strategy, "timeout_s": 600},
                     "checkpoint": {"every_steps": 2, "every_epochs": 0, "save_best": False, "keep_last": 1,
                                    "async_save": async_save}})
    start = time.perf_counter()
    trainer.run(cfg, detect(os.environ), task)
    return {"stall_s": statistics.median(stalls), "saves": len(stalls), "run_s": time.perf_counter() - start}


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as runs:
        for strategy, world_size in (("ddp", 1), ("fsdp", 2)):
            for async_save in (False, True):
                results[f"{strategy}, {'async' if async_save else 'sync'}"] = on_ranks(
                    train, strategy, async_save, runs, world_size=world_size)
    lines = ["| strategy, save | stall per save (s, median) | saves | whole run (s) |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['stall_s']:.3f} | {r['saves']} | {r['run_s']:.1f} |")
    for strategy in ("ddp", "fsdp"):
        ratio = results[f"{strategy}, async"]["stall_s"] / results[f"{strategy}, sync"]["stall_s"]
        lines.append(f"\n{strategy}: the async stall is {ratio:.3f} of the synchronous one")
        results[f"{strategy} async/sync"] = ratio
    out = HERE / "results" / f"async_save_{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
