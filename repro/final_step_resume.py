"""A checkpoint at the run's last step written before that epoch's end (a preemption there, or every_steps with
every_epochs 0): resumed, the run skipped the last epoch's end (validation, early stopping, best.pt, the epoch
checkpoint), so metrics.jsonl, summary.json and best.pt differ from the uninterrupted run's. Re-running a completed
every_epochs=0 run even cut its final validation out of metrics.jsonl."""
import sys; sys.path.insert(0, "/tmp/hunt3/repro")
import json, tempfile
from pathlib import Path
from harness import compare, train
cfg = {"task": "augtask:build", "data": {"batch_size": 16}, "train": {"epochs": 3, "log_every": 1},
       "checkpoint": {"every_steps": 4}}
ok = compare(cfg, [17])  # preempted at the last step (18)
d = Path(tempfile.mkdtemp())
cfg0 = {**cfg, "checkpoint": {"every_steps": 6, "every_epochs": 0}}
train(d, cfg0)
before = (d / "r" / "metrics.jsonl").read_text().splitlines()
again = train(d, cfg0)  # the same command again, on a completed run
after = (d / "r" / "metrics.jsonl").read_text().splitlines()
print("already_trained:", again.get("already_trained"), "records", len(before), "->", len(after))
ok = ok and len(before) == len(after)
sys.exit(0 if ok else 1)
