"""Elastic-restart stress: rank 1 is SIGKILLed mid-run under `--max-restarts 1`, N times per launch form.

Each trial must finish with exit 0 and the same final weights as an uninterrupted run. Launch forms:
`ddptrain launch` (fresh rendezvous store per attempt), raw `torchrun --standalone` (the shared agent
store, where ddptrain's per-attempt store prefix is what makes the restart work), and torchrun with a
static rendezvous (--master-addr/--master-port). torch 2.13's defaults fail or hang ~3 of 7 restarts.

    .venv/bin/python benchmarks/elastic_stress.py --trials 10
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """task: tasks_for_tests:regression_for_launch
task_args: {dropout: 0.2, kill_after: KILL}
data: {batch_size: 16}
optim: {name: adamw, lr: 0.01}
train: {epochs: 4, log_every: 1}
checkpoint: {every_steps: 5}
dist: {timeout_s: 20, init_timeout_s: 60}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(form: str, config: Path) -> list[str]:
    py = sys.executable
    train = ["-m", "ddptrain", "train", str(config), "runs_dir=runs"]
    if form == "ddptrain-launch":
        return [py, "-m", "ddptrain", "launch", "--nproc-per-node", "2", "--max-restarts", "1", str(config), "runs_dir=runs"]
    if form == "torchrun-standalone":
        return [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1", *train]
    return [py, "-m", "torch.distributed.run", "--nnodes=1", "--node-rank=0", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", "--nproc-per-node=2", "--max-restarts=1", *train]


def trial(form: str, kill_after: int, timeout: float) -> tuple[str, float, dict | None]:
    with tempfile.TemporaryDirectory() as d:
        config = Path(d) / "exp.yaml"
        config.write_text(CONFIG.replace("KILL", str(kill_after)))
        env = {k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
        env["PYTHONPATH"] = str(ROOT / "tests")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(command(form, config), cwd=d, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "hang", time.monotonic() - t0, None
        took = time.monotonic() - t0
        if proc.returncode != 0:
            return f"rc={proc.returncode}", took, None
        run_dir = Path(d) / "runs" / "exp"
        ckpts = sorted((run_dir / "checkpoints").glob("step-*.pt"))
        weights = torch.load(ckpts[-1], weights_only=True)["model"]
        summary = json.loads((run_dir / "summary.json").read_text())
        return ("ok" if summary["resumed_at_step"] > 0 else "no-restart"), took, weights


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--forms", default="ddptrain-launch,torchrun-standalone,torchrun-static")
    p.add_argument("--timeout", type=float, default=120)
    args = p.parse_args()
    _, _, reference = trial("ddptrain-launch", 0, args.timeout)  # kill_after 0: no crash
    results = {}
    for form in args.forms.split(","):
        rows = []
        for i in range(args.trials):
            outcome, took, weights = trial(form, 8 * (9 + i % 10), args.timeout)  # crash at steps 10..19
            same = weights is not None and all(torch.equal(weights[k], reference[k]) for k in reference)
            rows.append({"outcome": outcome, "seconds": round(took, 1), "matches_uninterrupted": same})
            print(f"{form:22s} trial {i + 1:2d}: {outcome:10s} {took:5.1f} s  same weights: {same}", flush=True)
        ok = sum(r["outcome"] == "ok" and r["matches_uninterrupted"] for r in rows)
        results[form] = {"ok": ok, "trials": args.trials, "rows": rows}
        print(f"{form}: {ok}/{args.trials} restarted and matched the uninterrupted run", flush=True)
    out = ROOT / "benchmarks" / "results" / f"elastic-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, **results}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
