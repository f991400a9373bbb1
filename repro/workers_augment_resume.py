"""Random augmentation drawn in DataLoader workers (map-style data, num_workers 2): a run preempted mid-epoch
(persistent workers: at any point) and resumed trains on other noise than the uninterrupted run."""
import sys; sys.path.insert(0, "/tmp/hunt3/repro")
from harness import compare
cfg = {"task": "augtask:build", "data": {"batch_size": 16, "num_workers": 2}, "train": {"epochs": 3, "log_every": 1},
       "checkpoint": {"every_steps": 4}}
sys.exit(0 if compare(cfg, [7]) else 1)
