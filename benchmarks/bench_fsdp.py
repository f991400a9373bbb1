"""DDP against FSDP on 2 CPU ranks (gloo): the training state each rank holds, and speed against a minimal
hand-written loop of each kind.

Workload: an MLP of 6 layers 1024 wide (6.3M parameters), AdamW, fp32, batch 64 per rank. For each of four
runners (minimal DDP loop, ddptrain ddp, minimal FSDP loop: `fully_shard` per layer then the root, and
ddptrain fsdp), 2 spawned ranks train `--steps` steps after 5 warm-up steps; rank 0 reports ms per step
and the bytes of parameters, gradients and optimizer state this rank holds (local shards under FSDP),
plus the process's peak RSS. Runners are interleaved over `--rounds` rounds; the median is reported.

Run from the repository root:  .venv/bin/python benchmarks/bench_fsdp.py [--rounds 3 --steps 40]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from spawned import on_ranks

HERE = Path(__file__).resolve().parent
WIDTH, LAYERS, BATCH = 1024, 6, 64
RUNNERS = ["minimal_ddp", "ddptrain_ddp", "minimal_fsdp", "ddptrain_fsdp"]


def model() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10))


def data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, WIDTH, generator=g), torch.randint(0, 10, (n,), generator=g))


def local_bytes(module: nn.Module, optimizer) -> dict:
    def size(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    params = sum(size(p) for p in module.parameters())
    grads = sum(size(p.grad) for p in module.parameters() if p.grad is not None)
    state = sum(size(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {"params_mb": params / 2**20, "grads_mb": grads / 2**20, "optimizer_mb": state / 2**20}


def minimal(kind: str, steps: int) -> dict:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    net = model()
    if kind == "ddp":
        net = nn.parallel.DistributedDataParallel(net)
    else:
        from torch.distributed.fsdp import fully_shard
        for layer in net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ds = data(BATCH * 2 * (steps + 5))
    sampler = torch.utils.data.DistributedSampler(ds, shuffle=True, seed=0, drop_last=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, sampler=sampler, drop_last=True)
    start = None
    for i, (x, y) in enumerate(loader):
        if i == 5:
            start = time.perf_counter()
        nn.functional.cross_entropy(net(x), y).backward()
        if i == 5:  # gradients in hand, the optimizer state made by the warm-up steps
            measured = local_bytes(net, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 5 + steps - 1:
            break
    elapsed = time.perf_counter() - start
    dist.destroy_process_group()
    return {"rank": rank, "ms_per_step": elapsed / steps * 1e3, **measured}


def with_ddptrain(kind: str, steps: int) -> dict:
    import ddptrain
    from ddptrain.configfile import from_dict
    from ddptrain.dist import detect
    from ddptrain.run import run
    times, measured = {}, {}

    def hook(step, micro, batch):
        if step == 5:
            times["start"] = time.perf_counter()
        if step == 6 and not measured:  # between steps: the gradients are freed (set to None) by then
            measured.update(local_bytes(net[0], opt[0]))
        if step == 5 + steps:
            times["end"] = time.perf_counter()
        return batch
    net, opt = [], []

    def task(cfg):
        m = model()
        net.append(m)
        return ddptrain.Task(model=m, train=data(BATCH * 2 * (steps + 6)),
                             optimizer=lambda groups: opt.append(torch.optim.AdamW(groups, lr=1e-3)) or opt[-1])
    cfg = from_dict({"name": kind, "runs_dir": tempfile.mkdtemp(), "loss": {"name": "cross_entropy"},
                     "data": {"batch_size": BATCH * 2}, "train": {"epochs": 1, "log_every": 1000},
                     "dist": {"strategy": kind}, "checkpoint": {"every_epochs": 0, "save_best": False},
                     **json.loads(os.environ.get("BENCH_DDPTRAIN_CONFIG", "{}"))})
    run(cfg, detect(os.environ), task, hooks={"before_micro_step": hook})
    measured["grads_mb"] = float("nan")  # not seen from the hook; during backward as large as the parameters
    return {"ms_per_step": (times["end"] - times["start"]) / steps * 1e3, **measured}


def runner_result(runner: str, steps: int) -> dict:
    kind = runner.split("_")[1]
    result = minimal(kind, steps) if runner.startswith("minimal") else with_ddptrain(kind, steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--runners", default=",".join(RUNNERS))
    args = p.parse_args()
    runners = args.runners.split(",")
    results = {r: [] for r in runners}
    for _ in range(args.rounds):
        for runner in runners:
            results[runner].append(on_ranks(runner_result, runner, args.steps))
    rows = ["| runner | ms/step (median) | params MB | grads MB | optimizer MB | peak RSS MB |", "|---|---|---|---|---|---|"]
    summary = {}
    for runner, runs in results.items():
        ms = statistics.median(r["ms_per_step"] for r in runs)
        last = runs[-1]
        summary[runner] = {"ms_per_step": ms, **{k: last[k] for k in ("params_mb", "grads_mb", "optimizer_mb", "peak_rss_mb")}}
        rows.append(f"| {runner} | {ms:.1f} | {last['params_mb']:.1f} | {last['grads_mb']:.1f} | "
                    f"{last['optimizer_mb']:.1f} | {last['peak_rss_mb']:.0f} |")
    for kind in [k for k in ("ddp", "fsdp") if f"minimal_{k}" in summary and f"ddptrain_{k}" in summary]:
        summary[f"ddptrain_over_minimal_{kind}"] = summary[f"minimal_{kind}"]["ms_per_step"] / summary[f"ddptrain_{kind}"]["ms_per_step"]
    out = HERE / "results" / f"fsdp_{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps({"rounds": args.rounds, "steps": args.steps, "summary": summary, "runs": results}, indent=2))
    print("\n".join(rows))
    ratios = ", ".join(f"{k.split('_')[-1]} {v:.3f}" for k, v in summary.items() if k.startswith("ddptrain_over"))
    print(f"ddptrain speed / minimal: {ratios}; written {out}")


if __name__ == "__main__":
    main()
