"""Per-step work counted, not timed: Python opcodes and aten ops per optimizer step, ddptrain against the
minimal loop, on bench_ddp.py's workload (the same runners, 2 ranks, gloo, CPU).

Timings on this shared 2-core machine move by a few percent from launch to launch; counts do not. An opcode
count says how much Python a step runs (every frame's, the loop's own included: torch's DataLoader, DDP and
optimizer code count for every runner); an aten count says how many tensor ops it dispatches. A change to
the per-step path should not raise either, and the figures show where ddptrain's extra Python is, by function.

    .venv/bin/python benchmarks/count_ops.py [--steps 50] [--runners minimal,ddptrain] [--top 25]

Tracing makes each step far slower; only the counts mean anything here.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WARMUP = 10


def worker(args) -> None:
    """One rank: the runner's loop, with opcodes and aten ops counted from step WARMUP for args.steps steps."""
    sys.path[:0] = [str(HERE), str(ROOT)]
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    import ddp_worker

    opcodes, aten = collections.Counter(), collections.Counter()

    def trace(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            opcodes[f"{code.co_filename.split('site-packages/')[-1]}:{code.co_name}"] += 1
        return trace

    class CountAten(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            aten[str(func)] += 1
            return func(*args, **(kwargs or {}))

    class Counting(ddp_worker.Timer):
        """Counts one kind per launch: a dispatch mode runs Python for every op, which tracing would count."""
        mode = CountAten()

        def at_step(self, step: int) -> bool:
            if step == self.warmup + self.steps:
                if args.count == "aten":
                    self.mode.__exit__(None, None, None)
                else:
                    sys.settrace(None)
                    frame = sys._getframe()
                    while frame is not None:
                        frame.f_trace = None
                        frame = frame.f_back
            done = super().at_step(step)
            if step == self.warmup:
                if args.count == "aten":
                    self.mode.__enter__()
                else:
                    frame = sys._getframe().f_back  # the frames running now (the loop's) count too
                    while frame is not None:
                        frame.f_trace, frame.f_trace_opcodes = trace, True
                        frame = frame.f_back
                    sys.settrace(trace)
            return done

    timer = Counting(WARMUP, args.steps)
    ds = ddp_worker.make_data(WARMUP + args.steps + 2, int(os.environ["WORLD_SIZE"]))
    ns = argparse.Namespace(size="tiny", warmup=WARMUP, steps=args.steps, tmp=args.tmp, patch=[], runner=args.runner)
    getattr(ddp_worker, "run_ddptrain" if args.runner.startswith("ddptrain") else f"run_{args.runner}")(ns, ds, timer)
    if int(os.environ["RANK"]) == 0:
        counted = opcodes if args.count == "opcodes" else aten
        Path(args.out).write_text(json.dumps({k: v / args.steps for k, v in counted.items()}))


def launch(runner: str, count: str, steps: int, tmp: str) -> dict:
    out = Path(tmp) / f"{runner}-{count}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--worker", "--runner", runner, "--count", count, "--steps", str(steps), "--tmp", tmp, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{runner} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--runners", default="minimal,ddptrain")
    p.add_argument("--top", type=int, default=25, help="functions listed where ddptrain runs more opcodes")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--runner", help=argparse.SUPPRESS)
    p.add_argument("--count", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        counts = {r: {kind: launch(r, kind, args.steps, tmp) for kind in ("opcodes", "aten")}
                  for r in args.runners.split(",")}
    base = counts["minimal"]
    print("| runner | Python opcodes / step | of them in ddptrain/ | aten ops / step |")
    print("|---|---:|---:|---:|")
    for runner, c in counts.items():
        own = sum(v for k, v in c["opcodes"].items() if "/ddptrain/" in k)
        print(f"| {runner} | {sum(c['opcodes'].values()):,.0f} | {own:,.0f} | {sum(c['aten'].values()):,.1f} |")
    for runner, c in counts.items():
        if runner == "minimal":
            continue
        extra = {k: c["opcodes"].get(k, 0) - base["opcodes"].get(k, 0) for k in c["opcodes"].keys() | base["opcodes"].keys()}
        print(f"\n{runner} over minimal, by function (opcodes per step):")
        for k, v in sorted(extra.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {v:7.1f}  {k.replace(str(ROOT) + '/', '')}")
        ops = {k: c["aten"].get(k, 0) - base["aten"].get(k, 0) for k in c["aten"].keys() | base["aten"].keys()}
        print(f"{runner} over minimal, aten ops per step: " +
              (", ".join(f"{k} {v:+.2f}" for k, v in sorted(ops.items(), key=lambda kv: -abs(kv[1])) if abs(v) >= 0.01)
               or "none"))


if __name__ == "__main__":
    main()
