"""One rank of one benchmark run: the same workload trained by one runner, timed at the same points.

Started by bench_ddp.py as `torchrun --standalone --nproc_per_node=2 ddp_worker.py --runner R --size S ...`.
Every runner calls `Timer.at_step(step)` at the top of each step, once the batch is in hand, with the
number of optimizer steps completed so far (for ddptrain that is its `before_micro_step` hook). Rank 0
writes one JSON result to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

torch.set_num_threads(1)

IN_FEATURES, CLASSES = 256, 10
HIDDEN = {"tiny": [64, 64], "big": [1024, 1024]}
PER_RANK_BATCH = 128
LR, MOMENTUM = 0.01, 0.9  # SGD with momentum, fp32, for every runner


def make_model(size: str) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights for every runner and rank
    widths, layers = [IN_FEATURES, *HIDDEN[size]], []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], CLASSES))


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def make_data(steps: int, world_size: int) -> TensorDataset:
    """Synthetic samples, identical on every rank, enough for `steps` global batches in one epoch."""
    n = (steps + 2) * PER_RANK_BATCH * world_size
    g = torch.Generator().manual_seed(1234)
    return TensorDataset(torch.randn(n, IN_FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


class Timer:
    """The timing points shared by every runner (rank 0 keeps the numbers).

    step == 1: the first optimizer step is finished (time to first step, wall clock from BENCH_T0).
    step == warmup: barrier (outside the window), then the window starts.
    step == warmup + steps: the window ends; `at_step` returns True and the runner stops.
    """

    def __init__(self, warmup: int, steps: int):
        assert warmup >= 2
        self.warmup, self.steps = warmup, steps
        self.first_step_wall = self.t_start = self.t_end = None
        self.threads = None

    def at_step(self, step: int) -> bool:
        if step == 1 and self.first_step_wall is None:
            self.first_step_wall = time.time()
        elif step == self.warmup and self.t_start is None:
            self.threads = torch.get_num_threads()
            dist.barrier()
            self.t_start = time.perf_counter()
        elif step == self.warmup + self.steps and self.t_end is None:
            self.t_end = time.perf_counter()
            return True
        return False


def params_in_sync(module: nn.Module) -> bool:
    """True when every rank holds bitwise the same parameters (DDP really ran). Call on all ranks."""
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        mine = torch.stack([flat.sum(), flat.abs().sum(), flat[::7].sum()]).double()
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
    return all(torch.equal(every[0], t) for t in every)


def run_minimal(args, ds, timer: Timer) -> dict:
    """The floor: DistributedSampler + DataLoader, DDP, zero_grad, forward, loss, backward, step."""
    dist.init_process_group("gloo")
    module = make_model(args.size)
    model = DDP(module)
    optimizer = make_optimizer(model.parameters())
    sampler = DistributedSampler(ds, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(ds, batch_size=PER_RANK_BATCH, sampler=sampler, drop_last=True)
    for step, (x, y) in enumerate(loader):
        if timer.at_step(step):
            break
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    info = {"ddp_wrapped": isinstance(model, DDP), "in_sync": params_in_sync(module)}
    del model, optimizer  # free DDP before destroy_process_group (gloo deadlock, pytorch#56297)
    gc.collect()
    dist.destroy_process_group()
    return info


def run_ddptrain(args, ds, timer: Timer) -> dict:
    from ddptrain import config, task, trainer
    from ddptrain.dist import detect

    module = make_model(args.size)
    info = {}
    world = int(os.environ["WORLD_SIZE"])
    cfg = config.from_dict({
        "task": "benchmark", "name": f"bench-{args.size}-rank{os.environ['RANK']}", "runs_dir": args.tmp, "seed": 0,
        "data": {"batch_size": PER_RANK_BATCH * world},  # ddptrain's batch_size is the global batch
        "optim": {"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": 0.0},
        "sched": {"name": "constant"},
        # max_steps = warmup + steps + 1 so that the hook sees step == warmup + steps; one epoch covers it.
        "train": {"epochs": 1, "max_steps": args.warmup + args.steps + 1, "log_every": 10**9, "precision": "fp32"},
        "dist": {"backend": "gloo", "device": "cpu"},
        "checkpoint": {"save_last": False, "save_best": False},
    })

    def task_fn(_cfg):
        return task.Task(model=module, train=ds, val=None, test=None, loss=F.cross_entropy, metrics={})

    def before_micro_step(step, micro_step, x, y):
        if timer.at_step(step):
            info["in_sync"] = params_in_sync(module)
        return x, y

    summary = trainer.run(cfg, detect(os.environ), task_fn, hooks={"before_micro_step": before_micro_step})
    info["ddp_wrapped"] = True  # ddptrain wraps whenever world_size > 1; in_sync checks it did
    info["ddptrain_steps"] = summary["steps"]
    return info


def run_accelerate(args, ds, timer: Timer) -> dict:
    from accelerate import Accelerator

    # A plain Accelerator() on a machine without a GPU silently runs two independent trainings.
    accelerator = Accelerator(cpu=True)
    module = make_model(args.size)
    optimizer = make_optimizer(module.parameters())
    loader = DataLoader(ds, batch_size=PER_RANK_BATCH, shuffle=True, drop_last=True)
    model, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    assert isinstance(model, DDP), f"Accelerate did not wrap the model in DDP: {type(model)}"
    assert accelerator.num_processes == 2
    for step, (x, y) in enumerate(loader):
        if timer.at_step(step):
            break
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
    info = {"ddp_wrapped": True, "in_sync": params_in_sync(module)}
    del model, optimizer, loader
    gc.collect()
    dist.destroy_process_group()
    return info


def run_fabric(args, ds, timer: Timer) -> dict:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=2, num_nodes=1, strategy="ddp", precision="32-true")
    fabric.launch()  # under torchrun this only joins the process group
    module = make_model(args.size)
    model, optimizer = fabric.setup(module, make_optimizer(module.parameters()))
    assert isinstance(model._forward_module, DDP), f"Fabric did not wrap the model in DDP: {type(model._forward_module)}"
    loader = fabric.setup_dataloaders(DataLoader(ds, batch_size=PER_RANK_BATCH, shuffle=True, drop_last=True))
    for step, (x, y) in enumerate(loader):
        if timer.at_step(step):
            break
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        fabric.backward(loss)
        optimizer.step()
    info = {"ddp_wrapped": True, "in_sync": params_in_sync(module)}
    del model, optimizer, loader
    gc.collect()
    dist.destroy_process_group()
    return info


RUNNERS = {"minimal": run_minimal, "ddptrain": run_ddptrain, "accelerate": run_accelerate, "fabric": run_fabric}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runner", choices=RUNNERS, required=True)
    p.add_argument("--size", choices=HIDDEN, required=True)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", required=True)
    p.add_argument("--tmp", required=True)
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    timer = Timer(args.warmup, args.steps)
    ds = make_data(args.warmup + args.steps + 1, world)
    info = RUNNERS[args.runner](args, ds, timer)
    if rank != 0:
        return
    assert timer.t_end is not None, "the run ended before the timing window closed"
    assert info["ddp_wrapped"] and info["in_sync"], info
    window = timer.t_end - timer.t_start
    t0 = float(os.environ["BENCH_T0"])
    result = {
        "runner": args.runner, "size": args.size, "world_size": world, "threads": timer.threads,
        "warmup": args.warmup, "steps": args.steps, "global_batch": PER_RANK_BATCH * world,
        "window_s": window, "step_ms": 1e3 * window / args.steps,
        "samples_per_s": args.steps * PER_RANK_BATCH * world / window,
        "time_to_first_step_s": timer.first_step_wall - t0, **info,
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
