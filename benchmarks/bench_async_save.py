"""How long training stalls for a checkpoint, written synchronously and in the background (checkpoint.async_save).

Workload: an MLP of 8 layers 2048 wide (33.6M parameters), AdamW: about 400 MB of training state (parameters
and the two moments, fp32). It trains 25 steps with a checkpoint every 8 and without any; the cost of a save is the
training time it adds, per save (see `train`): the whole write when synchronous; when asynchronous, the
copy left after overlapping the next step's forward and backward, plus the background write's competition
with training for the CPU. Under ddp it runs in one process (a whole copy), under fsdp on 2
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


STEPS, EVERY = 25, 8  # saves after steps 8, 16 and 24


def train(strategy: str, save: str, runs: str) -> dict:
    """Training time from the end of step 2 (after warm-up) to the run's end, which waits for a write in
    flight: with saves (`sync` or `async`) or without (`none`). The cost of a save is the difference over
    `none`, per save: what it adds wherever it lands (the copy, waits for it, the background write's
    competition for the CPU), not only the time the loop spends in the save call."""
    from ddptrain import trainer
    from ddptrain.config import from_dict
    from ddptrain.dist import detect
    ends = []
    after_step = trainer.Training.after_step

    def timed(self, epoch):
        done = after_step(self, epoch)
        ends.append(time.perf_counter())
        return done
    trainer.Training.after_step = timed
    cfg = from_dict({"name": f"{strategy}-{save}", "runs_dir": runs, "loss": {"name": "cross_entropy"},
                     "optim": {"name": "adamw", "lr": 1e-4}, "data": {"batch_size": 16},
                     "train": {"epochs": 2, "max_steps": STEPS, "log_every": 100},
                     "dist": {"strategy": strategy, "timeout_s": 600},
                     "checkpoint": {"every_steps": EVERY if save != "none" else None, "every_epochs": 0,
                                    "save_best": False, "keep_last": 1, "async_save": save == "async"}})
    trainer.run(cfg, detect(os.environ), task)
    return {"train_s": time.perf_counter() - ends[1], "saves": STEPS // EVERY if save != "none" else 0,
            "step_s": statistics.median(b - a for a, b in zip(ends[1:], ends[2:]))}


def main() -> None:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default="ddp,fsdp", help="ddp (1 process), fsdp (2 ranks), or both")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/async_save_<date>_<time>.json)")
    args = p.parse_args()
    strategies = args.strategies.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as runs:
        for strategy, world_size in (("ddp", 1), ("fsdp", 2)):
            if strategy not in strategies:
                continue
            for save in ("none", "sync", "async"):
                results[f"{strategy}, {save}"] = on_ranks(train, strategy, save, runs, world_size=world_size)
    lines = ["| strategy, save | training time (s) | saves | cost per save (s) | median step (s) |",
             "|---|---|---|---|---|"]
    for strategy in strategies:
        base = results[f"{strategy}, none"]["train_s"]
        for save in ("none", "sync", "async"):
            r = results[f"{strategy}, {save}"]
            r["cost_per_save_s"] = (r["train_s"] - base) / r["saves"] if r["saves"] else 0.0
            lines.append(f"| {strategy}, {save} | {r['train_s']:.2f} | {r['saves']} | {r['cost_per_save_s']:.3f} | "
                         f"{r['step_s']:.3f} |")
        ratio = results[f"{strategy}, async"]["cost_per_save_s"] / results[f"{strategy}, sync"]["cost_per_save_s"]
        results[f"{strategy} async/sync"] = ratio
        lines.append(f"\n{strategy}: an asynchronous save costs {ratio:.3f} of a synchronous one\n")
    out = Path(args.out) if args.out else HERE / "results" / f"async_save_{time.strftime('%Y-%m-%d_%H%M')}.json"
    out.write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
