"""One rank of one benchmark run: the same workload trained by one runner, timed at the same points.

Started by bench_ddp.py as `torchrun --standalone --nproc_per_node=2 ddp_worker.py --runner R --size S ...`.
Every runner calls `Timer.at_step(step)` at the top of each step, once the batch is in hand, with the
number of optimizer steps completed so far (for ddptrain that is its `before_micro_step` hook). Rank 0
writes one JSON result to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
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


CLK_TCK = os.sysconf("SC_CLK_TCK")


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (steal counts as busy: it is lost to us)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class Timer:
    """The timing points shared by every runner (rank 0 keeps the numbers).

    step == 1: the first optimizer step is finished (time to first step, wall clock from BENCH_T0).
    step == warmup: barrier (outside the window), then the window starts.
    step == warmup + steps: the window ends; `at_step` returns True and the runner stops.

    Inside the window every step's start time is kept too (one perf_counter and a list store per step,
    the same for every runner), for a per-step median that a short burst of interference cannot move.
    Just outside the window each rank reads its own CPU time and rank 0 the machine's busy time, so
    `finish` can tell how much CPU other processes took during the window (the machine is shared).
    """

    def __init__(self, warmup: int, steps: int):
        assert warmup >= 2
        self.warmup, self.steps = warmup, steps
        self.first_step_wall = self.t_start = self.t_end = None
        self.threads = None
        self.ticks = [0.0] * (steps + 1)

    def at_step(self, step: int) -> bool:
        if self.warmup < step < self.warmup + self.steps:
            self.ticks[step - self.warmup] = time.perf_counter()
        elif step == 1 and self.first_step_wall is None:
            self.first_step_wall = time.time()
        elif step == self.warmup and self.t_start is None:
            self.threads = torch.get_num_threads()
            self.cpu = [time.process_time(), busy_cpu_s()]
            dist.barrier()
            self.t_start = self.ticks[0] = time.perf_counter()
        elif step == self.warmup + self.steps and self.t_end is None:
            self.t_end = self.ticks[-1] = time.perf_counter()
            self.cpu = [time.process_time() - self.cpu[0], busy_cpu_s() - self.cpu[1]]
            return True
        return False

    def step_ms(self) -> list[float]:
        return [1e3 * (b - a) for a, b in zip(self.ticks, self.ticks[1:])]


def finish(module: nn.Module, timer: Timer) -> dict:
    """After the window: check that every rank holds bitwise the same parameters (DDP really ran), and
    add up the CPU the ranks used in the window; the rest of the machine's busy time is foreign. Call on all ranks."""
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        mine = torch.stack([flat.sum(), flat.abs().sum(), flat[::7].sum()]).double()
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        cpu = torch.tensor([timer.cpu[0]], dtype=torch.float64)
        dist.all_reduce(cpu)
    window = timer.t_end - timer.t_start
    foreign = timer.cpu[1] - float(cpu)
    return {"in_sync": all(torch.equal(every[0], t) for t in every), "ranks_cpu_s": float(cpu),
            "foreign_cpu_s": foreign, "foreign_cpu_frac": foreign / (window * os.cpu_count())}


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
    info = {"ddp_wrapped": isinstance(model, DDP), **finish(module, timer)}
    del model, optimizer  # free DDP before destroy_process_group (gloo deadlock, pytorch#56297)
    gc.collect()
    dist.destroy_process_group()
    return info


def patch_ddptrain(patches: list[str]) -> None:
    """Diagnostic switches: remove one piece of ddptrain's per-step work to see what it costs.

    nopoll: the preemption poll keeps its local flag but runs no all-reduce (single-rank semantics).
    nonorm: trainer.optimizer_step steps without the global grad norm, even at log steps.
    noview: DDP without gradient_as_bucket_view (applied in run_ddptrain's config).
    """
    from ddptrain import trainer
    for name in patches:
        if name == "nopoll":
            from ddptrain.preempt import Preemption
            Preemption.poll = lambda self: self.received is not None
        elif name == "nonorm":
            def optimizer_step(params, optimizer, precision, cfg, measure=True):
                precision.unscale(optimizer)
                stepped = precision.step(optimizer)
                optimizer.zero_grad(set_to_none=True)
                return torch.zeros(()), stepped
            trainer.optimizer_step = optimizer_step
        elif name != "noview":
            raise SystemExit(f"unknown patch {name!r}")


def run_ddptrain(args, ds, timer: Timer) -> dict:
    from ddptrain import config, configfile, run, task, trainer
    from ddptrain.dist import detect

    patch_ddptrain(args.patch)

    module = make_model(args.size)
    info = {}
    world = int(os.environ["WORLD_SIZE"])
    # ddptrain's checkpoint keys are changing; switch off whichever of them this version has.
    known = {f.name for f in dataclasses.fields(config.CheckpointConfig)}
    no_checkpoints = {k: v for k, v in {"save_last": False, "save_best": False, "every_epochs": 0,
                                        "every_steps": None}.items() if k in known}
    observed = {"log_every": 10, "log_grad_norms": True, "peak_flops": 1e11} if args.runner == "ddptrain_observed" \
        else {}
    cfg = configfile.from_dict({
        "task": "benchmark", "name": "bench", "runs_dir": args.tmp, "seed": 0,
        "data": {"batch_size": PER_RANK_BATCH * world},  # ddptrain's batch_size is the global batch
        "optim": {"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": 0.0},
        "sched": {"name": "constant"},
        # max_steps = warmup + steps + 1 so that the hook sees step == warmup + steps; one epoch covers it.
        "train": {"epochs": 1, "max_steps": args.warmup + args.steps + 1, "log_every": 10**9, "precision": "fp32",
                  **observed},
        "dist": {"backend": "gloo", "device": "cpu", "gradient_as_bucket_view": "noview" not in args.patch},
        "checkpoint": no_checkpoints,
    })

    def task_fn(_cfg):
        return task.Task(model=module, train=ds, val=None, test=None, loss=F.cross_entropy, metrics={})

    def before_micro_step(step, micro_step, *batch):  # (step, micro_step, x, y) before ddptrain 0.2
        if timer.at_step(step):
            info.update(finish(module, timer))
        return batch[0] if len(batch) == 1 else batch

    if args.runner == "ddptrain_dict":  # Hugging Face style items: {"input": x, "labels": y} -> model(input=x)
        ds = DictItems(ds)

    summary = run.run(cfg, detect(os.environ), task_fn, hooks={"before_micro_step": before_micro_step})
    info["ddp_wrapped"] = True  # ddptrain wraps whenever world_size > 1; in_sync checks it did
    info["ddptrain_file"] = trainer.__file__
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
    info = {"ddp_wrapped": True, **finish(module, timer)}
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
    info = {"ddp_wrapped": True, **finish(module, timer)}
    del model, optimizer, loader
    gc.collect()
    dist.destroy_process_group()
    return info


class DictItems(torch.utils.data.Dataset):
    def __init__(self, inner: TensorDataset):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        x, y = self.inner[i]
        return {"input": x, "labels": y}  # nn.Sequential's forward(input)


RUNNERS = {"minimal": run_minimal, "ddptrain": run_ddptrain, "ddptrain_dict": run_ddptrain,
           "ddptrain_observed": run_ddptrain, "accelerate": run_accelerate, "fabric": run_fabric}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runner", choices=RUNNERS, required=True)
    p.add_argument("--size", choices=HIDDEN, required=True)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", required=True)
    p.add_argument("--tmp", required=True)
    p.add_argument("--patch", action="append", default=[], help="ddptrain only, for diagnosis: nopoll, nonorm, noview")
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
    per_step = sorted(timer.step_ms())
    t0 = float(os.environ["BENCH_T0"])
    result = {
        "runner": args.runner, "size": args.size, "world_size": world, "threads": timer.threads,
        "warmup": args.warmup, "steps": args.steps, "global_batch": PER_RANK_BATCH * world,
        "window_s": window, "step_ms": 1e3 * window / args.steps,
        "step_ms_median": statistics.median(per_step), "step_ms_p10": per_step[len(per_step) // 10],
        "step_ms_p90": per_step[len(per_step) * 9 // 10], "samples_per_s_from_median_step":
            PER_RANK_BATCH * world / (statistics.median(per_step) / 1e3),
        "samples_per_s": args.steps * PER_RANK_BATCH * world / window,
        "time_to_first_step_s": timer.first_step_wall - t0,
        "cpu_ms_per_step": 1e3 * info["ranks_cpu_s"] / args.steps, **info,
    }
    if os.environ.get("BENCH_DUMP_STEPS") == "1":
        result["step_ms_all"] = timer.step_ms()
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
