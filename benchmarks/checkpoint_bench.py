"""Checkpoint cost for a model of about 100 MB: save, verify and load times, and the training stall.

A checkpoint holds the model, the optimizer state (AdamW: two more tensors per weight, so ~3x the
model) and the small run state. The save runs on rank 0 while the others wait at their next
collective, so its duration is the stall and must fit the preemption grace time (torchrun: 30 s).

    .venv/bin/python benchmarks/checkpoint_bench.py [--repeats 5] [--dir /some/disk]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ddptrain import checkpoint

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 2048))
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(64, 2048)

    def step():
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates the optimizer state
    times = {"step": [], "save": [], "verify": [], "load": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "step-000000001.pt"
        for _ in range(args.repeats):
            t = time.perf_counter(); step(); times["step"].append(time.perf_counter() - t)
            t = time.perf_counter()
            checkpoint.save(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1})
            times["save"].append(time.perf_counter() - t)
            t = time.perf_counter(); assert checkpoint.verify(path) is None; times["verify"].append(time.perf_counter() - t)
            t = time.perf_counter(); checkpoint.load(path); times["load"].append(time.perf_counter() - t)
        file_mb = path.stat().st_size / 2**20
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {model_mb:.0f} MB, checkpoint file {file_mb:.0f} MB (model + AdamW state)")
    for k in ("step", "save", "verify", "load"):
        print(f"  {k:7s} median {med[k]:.3f} s   (min {min(times[k]):.3f}, max {max(times[k]):.3f})")
    print(f"  save throughput {file_mb / med['save']:.0f} MB/s; a save costs the others a stall of "
          f"~{med['save'] / med['step']:.1f} training steps of this model")
    out = ROOT / "benchmarks" / "results" / f"checkpoint-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model_mb": model_mb, "file_mb": file_mb, "median_s": med, "all_s": times}, indent=2))


if __name__ == "__main__":
    main()
