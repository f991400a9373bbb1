"""How long training stalls for a checkpoint, written synchronously and in the background (checkpoint.async_save).

Workload: an MLP of 8 layers 2048 wide (33.6M parameters), AdamW: about 400 MB of training state (parameters
and the two moments, fp32). It trains 38 steps with a checkpoint every 8 (`--every`) and without any. Two
measures per save:
- the stall (issue 12's target): the time the loop is blocked by it, in the save call (the whole write when
  synchronous; the copy of what the next forward changes and the thread's start when asynchronous) and, when
  asynchronous, in the next optimizer step's wait for the background copy of the weights;
- the cost: all the training time it adds against the run without saves (see `train`), which also counts
  the background write's competition with training for the CPU. On a CPU that training keeps busy (fsdp,
  2 ranks on 2 cores) that competition is most of it; on a GPU, or with `--idle-s`, the CPU has time free.
Each save's own cost (its step and the next seven against the same steps without saves) is reported too:
the first save's and the median of the later ones. Under ddp it runs in one process (a whole copy), under
fsdp on 2 spawned ranks (each rank writes its half).

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


class Idle(nn.Module):
    """Waits `seconds` with the CPU idle (the GIL released), as a training process waits for its GPU's kernels."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def task(cfg):
    import ddptrain
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, WIDTH, generator=g), torch.randint(0, 10, (256,), generator=g))
    layers = [m for _ in range(LAYERS) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())]
    idle = [Idle(cfg.task_args["idle_s"])] if cfg.task_args.get("idle_s") else []
    return ddptrain.Task(model=nn.Sequential(*idle, *layers, nn.Linear(WIDTH, 10)), train=data)


SAVES = 4


def steps(every: int) -> int:
    """Saves after steps every, 2 every, ... SAVES every; the last write has nearly as long again to end in."""
    return (SAVES + 1) * every - 2


def train(strategy: str, save: str, runs: str, idle_s: float = 0.0, every: int = 8) -> dict:
    """Training time from the end of step 2 (after warm-up) to the run's end, which waits for a write in
    flight: with saves (`sync` or `async`) or without (`none`). The cost of a save is the difference over
    `none`, per save: what it adds wherever it lands (the copy, waits for it, the background write's
    competition for the CPU), not only the time the loop spends in the save call."""
    from ddptrain import run, saving, strategy as strategies, trainer
    from ddptrain.configfile import from_dict
    from ddptrain.dist import detect
    ends, blocked = [], {"save_s": [], "copy_wait_s": []}
    after_step, save_checkpoint, before_update = (trainer.Training.after_step, saving.save_checkpoint,
                                                  strategies.Writes.before_update)

    def timed(self, epoch):
        done = after_step(self, epoch)
        ends.append(time.perf_counter())
        return done

    def timed_save(training):  # the loop stalls here: the whole write when synchronous, the copy's start when not
        start = time.perf_counter()
        save_checkpoint(training)
        blocked["save_s"].append(time.perf_counter() - start)

    def timed_update(self):  # and here, asynchronously: the optimizer step waits for the copy of the weights
        start = time.perf_counter()
        before_update(self)
        if blocked["save_s"]:
            blocked["copy_wait_s"].append(time.perf_counter() - start)
    trainer.Training.after_step, saving.save_checkpoint = timed, timed_save
    strategies.Writes.before_update = timed_update
    cfg = from_dict({"name": f"{strategy}-{save}", "runs_dir": runs, "task_args": {"idle_s": idle_s},
                     "loss": {"name": "cross_entropy"},
                     "optim": {"name": "adamw", "lr": 1e-4}, "data": {"batch_size": 16},
                     "train": {"epochs": steps(every) // 16 + 1, "max_steps": steps(every), "log_every": 100},
                     "dist": {"strategy": strategy, "timeout_s": 600},
                     "checkpoint": {"every_steps": every if save != "none" else None, "every_epochs": 0,
                                    "save_best": False, "keep_last": 1, "async_save": save == "async"}})
    run.run(cfg, detect(os.environ), task)
    times = [b - a for a, b in zip(ends[1:], ends[2:])]  # steps 3 to the last: where a save's cost lands
    end = time.perf_counter()
    stall = sum(blocked["save_s"]) + sum(blocked["copy_wait_s"])
    return {"train_s": end - ends[1], "saves": SAVES if save != "none" else 0,
            "step_s": statistics.median(times), "steps_s": [round(t, 5) for t in times],
            "stall_per_save_s": stall / SAVES if save != "none" else 0.0, "end_s": end - ends[-1],
            "save_call_s": [round(t, 5) for t in blocked["save_s"]],
            "copy_wait_s": round(sum(blocked["copy_wait_s"]), 5)}


def costs(r: dict, none: dict, every: int) -> dict:
    """`r` with what its saves cost against the run without saves (`none`) of the same round: per save over
    the whole run, and each save's own (its step and the steps up to the next save, beyond the same steps
    without saves; steps_s[0] is step 3)."""
    per_save = (r["train_s"] - none["train_s"]) / r["saves"] if r["saves"] else 0.0
    each = [sum(a - b for a, b in zip(r["steps_s"][at - 3:at - 3 + every], none["steps_s"][at - 3:at - 3 + every]))
            for at in range(every, SAVES * every + 1, every)] if r["saves"] else []
    return {**r, "cost_per_save_s": per_save, "each_save_s": each}


def main() -> None:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default="ddp,fsdp", help="ddp (1 process), fsdp (2 ranks), or both")
    p.add_argument("--idle-s", type=float, default=0.0,
                   help="each step also waits this long with the CPU idle, as on a GPU (default 0: CPU-bound)")
    p.add_argument("--every", type=int, default=8, help="steps between saves; long enough for a write (default 8, "
                   "2 s on this CPU; a GPU's steps are shorter)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/async_save_<date>_<time>.json)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each (none, sync, async in turn); medians reported")
    args = p.parse_args()
    strategies = args.strategies.split(",")
    results, rounds = {}, {}
    with tempfile.TemporaryDirectory() as runs:
        for strategy, world_size in (("ddp", 1), ("fsdp", 2)):
            if strategy not in strategies:
                continue
            for k in range(args.rounds):  # each round in a directory of its own: no run resumes another
                runs_now = {save: on_ranks(train, strategy, save, f"{runs}/{k}", args.idle_s, args.every, world_size=world_size)
                            for save in ("none", "sync", "async")}
                for save, r in runs_now.items():
                    rounds.setdefault(f"{strategy}, {save}", []).append(costs(r, runs_now["none"], args.every))
    lines = ["| strategy, save | training time (s) | saves | stall per save (s) | cost per save (s) | first save (s) "
             "| later saves (s) | median step (s) |", "|---|---|---|---|---|---|---|---|"]
    for strategy in strategies:
        for save in ("none", "sync", "async"):
            each = rounds[f"{strategy}, {save}"]
            r = results[f"{strategy}, {save}"] = {
                "saves": each[0]["saves"], "rounds": each,
                **{key: statistics.median(e[key] for e in each) for key in ("train_s", "stall_per_save_s", "cost_per_save_s", "step_s")},
                "each_save_s": [statistics.median(by_round) for by_round in zip(*(e["each_save_s"] for e in each))]}
            first, later = (r["each_save_s"][0], statistics.median(r["each_save_s"][1:])) if r["saves"] else (0, 0)
            lines.append(f"| {strategy}, {save} | {r['train_s']:.2f} | {r['saves']} | {r['stall_per_save_s']:.3f} | "
                         f"{r['cost_per_save_s']:.3f} | "
                         f"{first:.3f} | {later:.3f} | {r['step_s']:.3f} |")
        sync, async_ = results[f"{strategy}, sync"], results[f"{strategy}, async"]
        ratio = async_["cost_per_save_s"] / sync["cost_per_save_s"]
        later = statistics.median(async_["each_save_s"][1:]) / statistics.median(sync["each_save_s"][1:])
        stall = async_["stall_per_save_s"] / sync["stall_per_save_s"]
        results[f"{strategy} async/sync"], results[f"{strategy} async/sync, later saves"] = ratio, later
        results[f"{strategy} async/sync stall"] = stall
        lines.append(f"\n{strategy}: an asynchronous save stalls the loop {stall:.3f} as long as a synchronous one; "
                     f"it costs {ratio:.3f} of its training time ({later:.3f} after the first)\n")
    out = Path(args.out) if args.out else HERE / "results" / f"async_save_{time.strftime('%Y-%m-%d_%H%M')}.json"
    out.write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
