"""Where ddptrain's per-step time goes, ingredient by ingredient, using ddptrain's own code.

Two modes:

  micro  one process, no DDP: each thing ddptrain's step does beyond the minimal loop (trainer.optimizer_step's
         global grad norm and finite check, build_optimizer's two param groups, the constant scheduler, the
         running loss sums, the l1/accumulation arithmetic) timed alone with many repeats.
         .venv-bench/bin/python benchmarks/diagnose_ddptrain.py micro --size tiny

  loop   2 ranks under torchrun: the minimal loop plus one ingredient at a time (also DDP's
         gradient_as_bucket_view and, where ddptrain has it, the per-step preemption poll), interleaved in
         short blocks inside one process pair so that launch-to-launch noise cancels. Reports wall ms/step
         on rank 0 and CPU ms/step of both ranks together (process CPU time, gloo threads included).
         OMP_NUM_THREADS=1 .venv-bench/bin/torchrun --standalone --nproc_per_node=2 benchmarks/diagnose_ddptrain.py loop --size tiny
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import time
import timeit
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from ddptrain import configfile
from ddptrain.batch import Forward
from ddptrain.losses import Sums
from ddptrain.observe import RankTime
from ddptrain.optim import build_optimizer, build_scheduler, changes_lr, optimizer_step
from ddptrain.precision import Precision
from ddptrain.step import TrainStep

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_worker import LR, MOMENTUM, PER_RANK_BATCH, make_data, make_model, make_optimizer  # noqa: E402

torch.set_num_threads(1)
CFG = configfile.from_dict({"optim": {"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": 0.0},
                            "sched": {"name": "constant"}, "train": {"precision": "fp32"}})
PRECISION = Precision("fp32", torch.device("cpu"))


def ddptrain_micro_step(model, module, optimizer):
    """ddptrain's own micro-step (TrainStep.micro_step: the Forward seam, autocast, the forward timer, the
    backward) and its loss bookkeeping (Sums.add), for fp32 without accumulation, as the loop calls them."""
    step = TrainStep(model, module, Forward(F.cross_entropy), optimizer, None, PRECISION, CFG.train, CFG.optim.l1,
                     None, RankTime(torch.device("cpu")))
    sums = Sums({}, torch.device("cpu"))

    def run(x, y) -> None:
        sums.add(step.micro_step((x, y), True))
    return run


def micro(size: str, number: int, repeat: int) -> dict:
    module = make_model(size)  # holds fixed gradients for the optimizer-side cases
    other = make_model(size)  # forward/backward cases run here, so they never touch those gradients
    x = torch.randn(PER_RANK_BATCH, 256)
    y = torch.randint(0, 10, (PER_RANK_BATCH,))
    F.cross_entropy(module(x), y).backward()
    grads = {p: p.grad.clone() for p in module.parameters()}
    one_group, two_groups = make_optimizer(module.parameters()), build_optimizer(module, CFG.optim)
    other_opt = make_optimizer(other.parameters())
    sched_opt = make_optimizer(module.parameters())
    scheduler = build_scheduler(sched_opt, CFG.sched, 10**6, LR)
    running = torch.zeros(2, dtype=torch.float64)
    loss = F.cross_entropy(module(x), y).detach()
    module_params = list(module.parameters())  # made once, as the trainer does

    def restore_grads():
        for p, g in grads.items():
            p.grad = g

    def plain_step_and_zero():
        restore_grads()
        one_group.step()
        one_group.zero_grad(set_to_none=True)

    def ddptrain_optimizer_step():
        restore_grads()
        optimizer_step(module_params, one_group, PRECISION, CFG.train, measure=False)  # as on a step between logs

    def grad_norm_and_check():
        grads_ = [p for p in module_params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in grads_])
        bool(torch.isfinite(norm))

    def running_sums():
        with torch.no_grad():
            running[0].add_(loss, alpha=len(y))
            running[1] += len(y)

    def fwd_bwd_plain():
        other_opt.zero_grad(set_to_none=True)
        F.cross_entropy(other(x), y).backward()

    other_micro_step = ddptrain_micro_step(other, other, other_opt)

    def fwd_bwd_ddptrain():
        other_opt.zero_grad(set_to_none=True)
        other_micro_step(x, y)

    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
    restore_grads()
    cases = {
        "whole minimal step, one process (scale)": lambda: (fwd_bwd_plain(), other_opt.step()),
        "optimizer.step + zero_grad (minimal)": plain_step_and_zero,
        "trainer.optimizer_step (ddptrain)": ddptrain_optimizer_step,
        "  of which: grad list + get_total_norm + isfinite sync": grad_norm_and_check,
        "SGD step, 1 param group": one_group.step,
        "SGD step, 2 param groups (build_optimizer)": two_groups.step,
        "scheduler.step() (constant)": scheduler.step,
        "running loss sums (2 in-place ops)": running_sums,
        "forward+backward, minimal": fwd_bwd_plain,
        "TrainStep.micro_step + Sums.add (ddptrain)": fwd_bwd_ddptrain,
    }
    rows = {}
    order = list(cases)
    samples = {name: [] for name in order}
    rng = random.Random(0)
    for _ in range(repeat):  # interleave the cases, so drift hits all alike
        rng.shuffle(order)
        for name in order:
            restore_grads()
            samples[name].append(timeit.timeit(cases[name], number=number) / number * 1e6)
    print(f"size {size}: microseconds per call, {repeat} x {number} calls, one process, 1 thread")
    print(f"{'':58} {'min':>9} {'median':>9}")
    for name in cases:
        s = samples[name]
        rows[name] = {"us_min": min(s), "us_median": statistics.median(s)}
        print(f"{name:58} {min(s):9.1f} {statistics.median(s):9.1f}")
    extra = {
        "optimizer_step - (step + zero_grad)": "trainer.optimizer_step (ddptrain)",
        "2 groups - 1 group": "SGD step, 2 param groups (build_optimizer)",
        "ddptrain fwd/bwd - minimal fwd/bwd": "TrainStep.micro_step + Sums.add (ddptrain)",
    }
    base = {"optimizer_step - (step + zero_grad)": "optimizer.step + zero_grad (minimal)",
            "2 groups - 1 group": "SGD step, 1 param group",
            "ddptrain fwd/bwd - minimal fwd/bwd": "forward+backward, minimal"}
    print("differences (medians, microseconds):")
    for label, name in extra.items():
        d = rows[name]["us_median"] - rows[base[label]]["us_median"]
        rows[label] = {"us_median": d}
        print(f"  {label:56} {d:+9.1f}")
    return {"size": size, "number": number, "repeat": repeat, "rows": rows}


def loop(size: str, block: int, rounds: int) -> dict | None:
    from ddptrain.dist import Dist, detect

    ddp_dist = Dist(detect(os.environ), torch.device("cpu"), "gloo", 600.0, 7200.0)  # as ddptrain: + a gloo control group
    world = dist.get_world_size()
    # Two copies of the same model: DDP as the minimal loop builds it, and with ddptrain's settings.
    plain_module, view_module = make_model(size), make_model(size)
    plain = DDP(plain_module)
    d = CFG.dist
    viewed = DDP(view_module, find_unused_parameters=d.find_unused_parameters, static_graph=d.static_graph,
                 gradient_as_bucket_view=d.gradient_as_bucket_view, bucket_cap_mb=d.bucket_cap_mb)
    try:  # the preemption poll is new in ddptrain (a per-step async all-reduce on the control group)
        from ddptrain.preempt import Preemption
        preemption = Preemption(CFG.preempt.signals, ddp_dist)
    except (ImportError, AttributeError):
        preemption = None

    def minimal(model, opt, extra=None):
        def step(x, y):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if extra is not None:
                extra()
        return step

    def bookkeeping(model, module, opt):
        micro_step = ddptrain_micro_step(model, module, opt)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            micro_step(x, y)
            opt.step()
        return step

    def with_optimizer_step(model, module, opt):
        params = list(module.parameters())
        def step(x, y):
            F.cross_entropy(model(x), y).backward()
            optimizer_step(params, opt, PRECISION, CFG.train, measure=False)
        return step

    def ddptrain_like(model, module, opt, sched):
        """The body of ddptrain's loop for one fp32 step without accumulation, as written there."""
        params, micro_step = list(module.parameters()), ddptrain_micro_step(model, module, opt)

        def step(x, y):
            micro_step(x, y)
            optimizer_step(params, opt, PRECISION, CFG.train, measure=False)
            if changes_lr(sched):
                sched.step()
            if preemption is not None:
                preemption.poll()
        return step

    sched_opt, view_opt = make_optimizer(plain_module.parameters()), build_optimizer(view_module, CFG.optim)
    variants = {
        "minimal": minimal(plain, make_optimizer(plain_module.parameters())),
        "+ gradient_as_bucket_view": minimal(viewed, make_optimizer(view_module.parameters())),
        "+ 2 param groups": minimal(plain, build_optimizer(plain_module, CFG.optim)),
        "+ TrainStep.micro_step, Sums.add": bookkeeping(plain, plain_module, make_optimizer(plain_module.parameters())),
        "+ trainer.optimizer_step": with_optimizer_step(plain, plain_module, make_optimizer(plain_module.parameters())),
        "+ scheduler.step": minimal(plain, sched_opt, build_scheduler(sched_opt, CFG.sched, 10**6, LR).step),
    }
    if preemption is not None:
        variants["+ preemption.poll"] = minimal(plain, make_optimizer(plain_module.parameters()), preemption.poll)
    variants["ddptrain-like (all)"] = ddptrain_like(viewed, view_module, view_opt,
                                                    build_scheduler(view_opt, CFG.sched, 10**6, LR))

    ds = make_data(64, world)  # a pool of 64 batches per rank, cycled: the content does not matter here
    sampler = DistributedSampler(ds, shuffle=True, seed=0, drop_last=True)
    batches = itertools.cycle(list(DataLoader(ds, batch_size=PER_RANK_BATCH, sampler=sampler, drop_last=True)))
    for fn in variants.values():  # warm-up, untimed
        for _ in range(3):
            fn(*next(batches))

    rng = random.Random(0)  # the same order on every rank
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for _ in range(rounds):
        names = list(variants)
        rng.shuffle(names)
        for name in names:
            fn = variants[name]
            xs = [next(batches) for _ in range(block)]
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            for x, y in xs:
                fn(x, y)
            c1, t1 = time.process_time(), time.perf_counter()
            wall[name].append(1e3 * (t1 - t0) / block)
            cpu[name].append(1e3 * (c1 - c0) / block)
    if preemption is not None:
        preemption.close()
    names = list(variants)
    mine = torch.tensor([cpu[n] for n in names], dtype=torch.float64)
    dist.all_reduce(mine)  # CPU ms/step of both ranks together
    del plain, viewed, variants
    dist.destroy_process_group()
    if int(os.environ["RANK"]) != 0:
        return None
    cpu_both = {n: mine[i].tolist() for i, n in enumerate(names)}
    rows = {}
    print(f"size {size}: {rounds} rounds x {block} steps per variant; extra = median of per-round differences "
          f"to the minimal loop [IQR]")
    print(f"{'variant':28} {'wall ms/step':>12} {'extra wall ms':>24} {'CPU ms/step, 2 ranks':>21} {'extra CPU ms':>24}")
    for n in names:
        dw = sorted(a - b for a, b in zip(wall[n], wall["minimal"]))
        dc = sorted(a - b for a, b in zip(cpu_both[n], cpu_both["minimal"]))
        qw = statistics.quantiles(dw, n=4) if len(dw) > 1 else [dw[0]] * 3
        qc = statistics.quantiles(dc, n=4) if len(dc) > 1 else [dc[0]] * 3
        rows[n] = {"wall_ms_median": statistics.median(wall[n]), "extra_wall_ms_median": statistics.median(dw),
                   "extra_wall_ms_iqr": [qw[0], qw[2]], "cpu_ms_both_ranks_median": statistics.median(cpu_both[n]),
                   "extra_cpu_ms_median": statistics.median(dc), "extra_cpu_ms_iqr": [qc[0], qc[2]]}
        print(f"{n:28} {statistics.median(wall[n]):12.3f} {statistics.median(dw):+8.3f} [{qw[0]:+.2f},{qw[2]:+.2f}]"
              f" {statistics.median(cpu_both[n]):16.3f} {statistics.median(dc):+10.3f} [{qc[0]:+.2f},{qc[2]:+.2f}]")
    return {"size": size, "block": block, "rounds": rounds, "variants": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["micro", "loop"])
    p.add_argument("--size", choices=["tiny", "big"], default="tiny")
    p.add_argument("--block", type=int, default=None, help="loop: steps per block (default 25 tiny, 5 big)")
    p.add_argument("--rounds", type=int, default=None, help="loop: rounds of blocks (default 40 tiny, 20 big)")
    p.add_argument("--number", type=int, default=None, help="micro: calls per sample (default 200 tiny, 20 big)")
    p.add_argument("--repeat", type=int, default=15, help="micro: samples per case")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.mode == "micro":
        result = micro(args.size, args.number or (200 if args.size == "tiny" else 20), args.repeat)
    else:
        result = loop(args.size, args.block or (25 if args.size == "tiny" else 5),
                      args.rounds or (40 if args.size == "tiny" else 20))
    if result is not None and args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
