"""Where ddptrain's per-step time goes: the minimal loop plus one ddptrain ingredient at a time.

Every variant runs in the same 2-rank process pair, in blocks of steps interleaved round by round, so
launch-to-launch noise cancels; each ingredient is ddptrain's own code (build_optimizer, build_scheduler,
trainer.optimizer_step, Precision, l1_penalty) or its DDP settings. Rank 0 prints ms/step per variant and
the median paired difference to the minimal loop of the same round.

    OMP_NUM_THREADS=1 .venv-bench/bin/torchrun --standalone --nproc_per_node=2 benchmarks/diagnose_ddptrain.py --size tiny
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from ddptrain import config
from ddptrain.optim import build_optimizer, build_scheduler, l1_penalty
from ddptrain.precision import Precision
from ddptrain.trainer import optimizer_step
from ddp_worker import LR, MOMENTUM, PER_RANK_BATCH, make_data, make_model, make_optimizer

torch.set_num_threads(1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=["tiny", "big"], default="tiny")
    p.add_argument("--block", type=int, default=None, help="steps per block (default 50 tiny, 10 big)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of blocks (default 15 tiny, 8 big)")
    p.add_argument("--out", default=None, help="write rank 0's results as JSON here")
    args = p.parse_args()
    block = args.block or (50 if args.size == "tiny" else 10)
    rounds = args.rounds or (15 if args.size == "tiny" else 8)
    dist.init_process_group("gloo")
    world = dist.get_world_size()

    cfg = config.from_dict({"optim": {"name": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": 0.0},
                            "sched": {"name": "constant"}, "train": {"precision": "fp32"}})
    precision = Precision("fp32", torch.device("cpu"))
    # Two copies of the same model: DDP as the minimal loop builds it, and with ddptrain's settings.
    plain_module, view_module = make_model(args.size), make_model(args.size)
    plain = DDP(plain_module)
    d = cfg.dist
    viewed = DDP(view_module, find_unused_parameters=d.find_unused_parameters, static_graph=d.static_graph,
                 gradient_as_bucket_view=d.gradient_as_bucket_view, bucket_cap_mb=d.bucket_cap_mb)
    running = torch.zeros(2, dtype=torch.float64)

    def minimal(model, opt):
        def step(x, y):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step

    def bookkeeping(model, module, opt):
        """The loss path of ddptrain's loop: + l1_penalty, / grad_accum_steps, running loss sums."""
        def step(x, y):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            objective = loss + l1_penalty(module, cfg.optim.l1)
            precision.backward(objective / cfg.train.grad_accum_steps)
            with torch.no_grad():
                running[0] += loss.detach().double() * len(y)
                running[1] += len(y)
            opt.step()
        return step

    def ddptrain_step(model, module, opt):
        """trainer.optimizer_step: unscale, global grad norm, finite check (host sync), step, zero_grad."""
        def step(x, y):
            F.cross_entropy(model(x), y).backward()
            optimizer_step(module, opt, precision, cfg)
        return step

    def with_scheduler(model, opt, sched):
        def step(x, y):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        return step

    def ddptrain_like(model, module, opt, sched):
        """The body of ddptrain's _fit for one fp32 step without accumulation, as written there."""
        def step(x, y):
            with contextlib.nullcontext():
                with precision.autocast():
                    out = model(x)
                    loss = F.cross_entropy(out, y)
                    objective = loss + l1_penalty(module, cfg.optim.l1)
                precision.backward(objective / cfg.train.grad_accum_steps)
            with torch.no_grad():
                running[0] += loss.detach().double() * len(y)
                running[1] += len(y)
            optimizer_step(module, opt, precision, cfg)
            sched.step()
        return step

    two_group_opt = build_optimizer(plain_module, cfg.optim)
    sched_opt = make_optimizer(plain_module.parameters())
    view_opt = build_optimizer(view_module, cfg.optim)
    variants = {
        "minimal": minimal(plain, make_optimizer(plain_module.parameters())),
        "+ gradient_as_bucket_view": minimal(viewed, make_optimizer(view_module.parameters())),
        "+ 2 param groups (build_optimizer)": minimal(plain, two_group_opt),
        "+ loss bookkeeping (l1 add, /accum, running sums)": bookkeeping(plain, plain_module, make_optimizer(plain_module.parameters())),
        "+ optimizer_step (grad norm, isfinite sync)": ddptrain_step(plain, plain_module, make_optimizer(plain_module.parameters())),
        "+ scheduler.step (constant)": with_scheduler(plain, sched_opt, build_scheduler(sched_opt, cfg.sched, 10**6, LR)),
        "ddptrain-like (all of the above)": ddptrain_like(viewed, view_module, view_opt,
                                                          build_scheduler(view_opt, cfg.sched, 10**6, LR)),
    }

    ds = make_data(block * len(variants) * rounds + 1, world)
    sampler = DistributedSampler(ds, shuffle=True, seed=0, drop_last=True)
    batches = iter(DataLoader(ds, batch_size=PER_RANK_BATCH, sampler=sampler, drop_last=True))
    for fn in variants.values():  # warm-up, untimed
        for _ in range(3):
            fn(*next(batches))

    rng = random.Random(0)  # the same order on every rank
    times = {name: [] for name in variants}
    for _ in range(rounds):
        names = list(variants)
        rng.shuffle(names)
        for name in names:
            fn = variants[name]
            xs = [next(batches) for _ in range(block)]
            dist.barrier()
            t0 = time.perf_counter()
            for x, y in xs:
                fn(x, y)
            times[name].append(1e3 * (time.perf_counter() - t0) / block)

    if dist.get_rank() == 0:
        base = times["minimal"]
        rows = {}
        print(f"size {args.size}: {rounds} rounds x {block} steps per variant (ms/step, rank 0)")
        print(f"{'variant':52} {'median ms':>9} {'extra ms vs minimal: median [min-max]':>40}")
        for name, ts in times.items():
            diffs = sorted(t - b for t, b in zip(ts, base))
            rows[name] = {"ms_per_step_median": statistics.median(ts), "extra_ms_median": statistics.median(diffs),
                          "extra_ms_min": diffs[0], "extra_ms_max": diffs[-1], "ms_per_step": ts}
            print(f"{name:52} {statistics.median(ts):9.3f} {statistics.median(diffs):+12.3f} "
                  f"[{diffs[0]:+.3f} .. {diffs[-1]:+.3f}]")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"size": args.size, "block": block, "rounds": rounds, "variants": rows}, f, indent=1)
    del plain, viewed, variants
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
