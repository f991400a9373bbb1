"""A completed run (max_steps=8) continued with max_steps=16: wandb must get every new train step."""
import json, os, sys, tempfile
from pathlib import Path
sys.path[:0] = ["tests"]
os.environ.pop("WANDB_API_KEY", None)
from ddptrain import train
from wandb_files import read_run

tmp = Path(tempfile.mkdtemp())
cfg = {"task": "tasks_for_tests:regression", "name": "r", "runs_dir": str(tmp), "task_args": {"n_test": 40}, "data": {"batch_size": 32},
       "train": {"epochs": 10, "log_every": 1, "max_steps": 8},
       "wandb": {"enabled": True, "mode": "offline", "project": "tests"}}
train(cfg)
train({**cfg, "train": {**cfg["train"], "max_steps": 16}})
runs = [read_run(next(d.glob("run-*.wandb"))) for d in sorted((tmp / "r" / "wandb").glob("offline-run-*"))]
steps = [h["_step"] for r in runs for h in r["history"] if "train/loss" in h]
local = [json.loads(l)["step"] for l in open(tmp / "r" / "metrics.jsonl") if json.loads(l)["split"] == "train"]
print("wandb train steps:", steps)
print("local train steps:", local)
assert steps == list(range(1, 17)), steps
