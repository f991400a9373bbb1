"""Token-mean cross entropy on padded sequences: 2 ranks x 8 should train like 1 rank x 16 and like 4 micro-batches."""
import sys, torch
sys.path[:0] = ["/tmp/hunt2/tests", "/tmp/hunt2/repro"]
from multirank import run_ranks
from killing import train_rank

CFG = {"task": "tasks_pad:padded", "data": {"batch_size": 16}, "loss": {"name": "cross_entropy"},
       "optim": {"name": "sgd", "lr": 0.5}, "train": {"epochs": 2, "log_every": 2},
       "checkpoint": {"every_epochs": 0, "save_best": False}}
import tempfile, pathlib
tmp = pathlib.Path(tempfile.mkdtemp())
one = run_ranks(train_rank, 1, tmp / "one", CFG, None, "tasks_pad")[0]
two = run_ranks(train_rank, 2, tmp / "two", CFG, None, "tasks_pad")[0]
acc = run_ranks(train_rank, 1, tmp / "acc", {**CFG, "train": {**CFG["train"], "grad_accum_steps": 4}}, None, "tasks_pad")[0]
for name, r in (("2 ranks", two), ("accum 4", acc)):
    d = max((r["weights"][k] - one["weights"][k]).abs().max().item() for k in one["weights"])
    print(name, "max weight diff vs 1 rank:", d)
print("val", one["summary"]["val"], two["summary"]["val"], acc["summary"]["val"])
