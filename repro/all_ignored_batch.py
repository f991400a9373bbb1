"""A validation batch whose labels are all ignore_index (a padded-out sample alone in the last batch):
its loss, a mean over no tokens, is NaN, and NaN x 0 tokens made the whole validation loss NaN."""
import sys, os, tempfile
sys.path[:0] = ["/tmp/hunt2/tests", "/tmp/hunt2/repro"]
import torch
from ddptrain.config import from_dict
from ddptrain.dist import detect
from ddptrain.trainer import run
import tasks_pad

class AllPadLast(tasks_pad.Padded):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.y[-1] = -100

def task(cfg):
    t = tasks_pad.padded(cfg)
    t.val = AllPadLast(37, seed=2)
    return t

cfg = from_dict({"runs_dir": tempfile.mkdtemp(), "task": "all_ignored_batch:task", "data": {"batch_size": 16, "eval_batch_size": 4},
                 "loss": {"name": "cross_entropy"}, "optim": {"name": "sgd", "lr": 0.5}, "train": {"epochs": 1},
                 "checkpoint": {"every_epochs": 0, "save_best": False}})
try:
    s = run(cfg, detect({}))
    print("val", s["val"])
except Exception as e:
    print(type(e).__name__, e)
