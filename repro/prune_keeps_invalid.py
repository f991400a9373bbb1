"""keep_last=1: a newer checkpoint left without its marker (writer killed between rename and marker) makes
the prune after the next (off-grid) save delete the checkpoint just written: no valid checkpoint is left."""
import shutil, sys, tempfile
from pathlib import Path
import ddptrain
from ddptrain import checkpoint

d = Path(tempfile.mkdtemp())
cfg = {"task": "tasks_for_tests:regression", "runs_dir": str(d), "name": "r", "data": {"batch_size": 16},
       "train": {"epochs": 100, "max_steps": 8, "log_every": 1},
       "checkpoint": {"every_steps": 4, "every_epochs": 0, "keep_last": 1}}
ddptrain.train(cfg)
ck = d / "r" / "checkpoints"
shutil.copy(ck / "step-000000008.pt", ck / "step-000000012.pt")  # as if killed before step 12's marker
# a preemption (or any off-grid save) at step 10: here the end of a longer run with an epoch checkpoint
ddptrain.train(cfg, overrides=["train.max_steps=10", "checkpoint.every_epochs=1"])
print(sorted(p.name for p in ck.iterdir()))
print("latest valid:", checkpoint.latest_valid(ck))
sys.exit(0 if checkpoint.latest_valid(ck) is not None else 1)
